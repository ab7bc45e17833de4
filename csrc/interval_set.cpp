// C++ backend of nanolab.insertion.IntervalSet: a treap of disjoint closed int64 intervals [lo, hi].
//
// Same algorithm, priorities and results as the pure-Python reference in nanolab/insertion/interval_set.py:
//   * BST on lo, max-heap on the rank (prio, lo), prio = next splitmix64 output, drawn once per created
//     node. A treap is unique given its (key, rank) pairs, so both backends build identical trees, and
//     so does add_many below, which inserts in sorted order or rebuilds instead of inserting one by one.
//   * Every node also stores max_end = max(hi, left.max_end, right.max_end), the largest end in its
//     subtree, kept exact by insert, split, merge, remove and the O(n) rebuilds (there are no rotations:
//     insert = split the subtree at the new node's place, remove = merge its children).
//   * find (find_overlap, overlaps, add's error) is the classic interval-tree descent: the leftmost interval
//     ending at/after lo is in the left subtree if left.max_end >= lo, else it is the node itself if
//     hi >= lo, else it is in the right subtree. Every overlap of [lo, hi] ends at/after lo, so [lo, hi]
//     overlaps the set iff that interval starts at/before hi, and then it is the overlap with the smallest lo.
//   * insert_if_free (add_if_free, add, add_many's inserts) must walk the search path of lo anyway, to find
//     the new node's place, so it answers the yes/no overlap question on that walk: an interval that
//     overlaps [lo, hi] is a node where the path turns right (lo' <= lo) with hi' >= lo, or lies in the left
//     subtree of such a node (then max_end of that subtree >= lo), or starts after lo and at/before hi (then
//     so does the successor of lo, the last node where the path turns left). This is the same max_end test,
//     applied to the left subtrees the path passes, in one walk instead of two (~1.1x faster inserts here).
//     In a disjoint set (every set built by add) the left subtree of a right turn ends before lo, so the walk
//     skips that test and reads one node per level; a set loaded with disjoint=false keeps it.
//   Neither needs the intervals to be disjoint; the set stays disjoint because inserts follow a failed test.
//   * check_invariants() verifies BST order, disjointness, heap order, max_end at every node and the size.
// Nodes live in one vector and link by int32 index (40 bytes each); removed slots are reused. A walk touches
// one node per level plus, on right turns, the left child's max_end (fetched while the right child is
// prefetched, so the two misses overlap), and the tree is ~2 ln n deep.
// The one-interval calls also come as METH_FASTCALL builtins (Treap.fast_methods(), bound per instance by
// IntervalSet): pybind11's generic dispatcher costs ~0.09 us a call, a tenth of an insert into a 1M set.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::string fmt(int64_t lo, int64_t hi) { return "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]"; }

void check(int64_t lo, int64_t hi) {
  if (hi < lo) throw py::value_error("invalid interval " + fmt(lo, hi) + ": hi < lo");
}

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

struct Node {
  int64_t lo, hi;
  int64_t max_end;  // largest hi in this node's subtree
  uint64_t prio;
  int32_t left, right;
};
static_assert(sizeof(Node) == 40, "Node layout");

// Allocator for the node array: blocks of 2 MiB and more are 2 MiB aligned and marked MADV_HUGEPAGE, so a
// 1M-node tree (40 MB) spans ~20 TLB entries instead of ~10k 4 KiB pages. A random descent touches one new
// page per level, so with small pages most levels also miss the TLB (~1.25x faster 1M inserts here).
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  static constexpr size_t kHuge = size_t{1} << 21;
  HugePageAllocator() = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes < kHuge) return std::allocator<T>().allocate(n);
    void* p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages it changes nothing
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    if (n * sizeof(T) < kHuge)
      std::allocator<T>().deallocate(p, n);
    else
      std::free(p);
  }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
using NodeVec = std::vector<Node, HugePageAllocator<Node>>;

class Treap {
 public:
  explicit Treap(uint64_t seed) : rng_(seed) {}

  size_t size() const { return size_; }
  uint64_t rng_state() const { return rng_; }

  py::object find_overlap(int64_t lo, int64_t hi) const {
    check(lo, hi);
    int32_t t = find(lo, hi);
    if (t < 0) return py::none();
    return py::make_tuple(nodes_[t].lo, nodes_[t].hi);
  }

  bool overlaps(int64_t lo, int64_t hi) const {
    check(lo, hi);
    return find(lo, hi) >= 0;
  }

  bool add_if_free(int64_t lo, int64_t hi) {
    check(lo, hi);
    if (!insert_if_free(lo, hi, splitmix64_mix(rng_ + kGamma))) return false;
    rng_ += kGamma;  // the generator only advances on success
    return true;
  }

  void add(int64_t lo, int64_t hi) {
    if (!add_if_free(lo, hi)) {
      int32_t t = find(lo, hi);
      throw py::value_error("interval " + fmt(lo, hi) + " overlaps existing interval " +
                            fmt(nodes_[t].lo, nodes_[t].hi));
    }
  }

  void remove(int64_t lo, int64_t hi) {
    path_.clear();  // ancestors of the removed node, whose max_end may shrink
    int32_t* link = &root_;
    while (*link >= 0 && nodes_[*link].lo != lo) {
      path_.push_back(*link);
      link = lo < nodes_[*link].lo ? &nodes_[*link].left : &nodes_[*link].right;
    }
    if (*link < 0 || nodes_[*link].hi != hi) throw py::key_error("interval " + fmt(lo, hi) + " not in set");
    int32_t x = *link;
    *link = merge(nodes_[x].left, nodes_[x].right);
    free_.push_back(x);
    --size_;
    for (auto it = path_.rbegin(); it != path_.rend(); ++it) {
      const int64_t before = nodes_[*it].max_end;
      pull(*it);
      if (nodes_[*it].max_end == before) break;  // unchanged here, so unchanged above
    }
  }

  // Adds each interval in order if it is free (later ones see earlier ones); returns which were added.
  // Same result and tree as calling add_if_free in a loop, computed in sorted order for cache locality:
  //   1. sort the batch by lo; test each against the tree (sorted probes reuse the cached path, or a
  //      linear merge against the in-order contents when the batch is large);
  //   2. among the survivors, only intervals that chain-overlap each other (a "cluster" in sorted order)
  //      can conflict; resolve each cluster greedily in input order;
  //   3. draw priorities for the accepted intervals in input order, exactly as the loop would;
  //   4. insert them in sorted order, or rebuild the whole treap in O(n + m) when the batch is large.
  py::array_t<bool> add_many(I64Array los, I64Array his) {
    if (los.ndim() != 1 || his.ndim() != 1 || los.shape(0) != his.shape(0))
      throw py::value_error("add_many: los and his must be 1-D arrays of the same length, got shapes " +
                            shape_str(los) + " and " + shape_str(his));
    const size_t m = static_cast<size_t>(los.shape(0));
    const int64_t* lo = los.data();
    const int64_t* hi = his.data();
    for (size_t i = 0; i < m; ++i)
      if (hi[i] < lo[i])
        throw py::value_error("add_many: invalid interval " + fmt(lo[i], hi[i]) + " at index " + std::to_string(i) +
                              ": hi < lo");
    if (size_ + m >= static_cast<size_t>(INT32_MAX)) throw std::length_error("IntervalSet: too many intervals");
    py::array_t<bool> result(static_cast<py::ssize_t>(m));
    add_sorted(lo, hi, m, result.mutable_data());  // keeps the GIL: the tree is not safe to share while mutating
    return result;
  }

  int depth() const {  // iterative: the tree is shallow in expectation, but not guaranteed to be
    int best = 0;
    std::vector<std::pair<int32_t, int>> stack;
    if (root_ >= 0) stack.push_back({root_, 1});
    while (!stack.empty()) {
      auto [t, d] = stack.back();
      stack.pop_back();
      best = std::max(best, d);
      if (nodes_[t].left >= 0) stack.push_back({nodes_[t].left, d + 1});
      if (nodes_[t].right >= 0) stack.push_back({nodes_[t].right, d + 1});
    }
    return best;
  }

  // In-order (lo, hi, prio) arrays.
  std::tuple<py::array_t<int64_t>, py::array_t<int64_t>, py::array_t<uint64_t>> arrays() const {
    NodeVec v = in_order();
    py::array_t<int64_t> los(v.size()), his(v.size());
    py::array_t<uint64_t> prios(v.size());
    for (size_t k = 0; k < v.size(); ++k) {
      los.mutable_data()[k] = v[k].lo;
      his.mutable_data()[k] = v[k].hi;
      prios.mutable_data()[k] = v[k].prio;
    }
    return {los, his, prios};
  }

  // Pre-order (lo, hi, prio) tuples: together with the in-order this pins down the tree shape.
  std::vector<std::tuple<int64_t, int64_t, uint64_t>> structure() const {
    std::vector<std::tuple<int64_t, int64_t, uint64_t>> out;
    std::vector<int32_t> stack;
    if (root_ >= 0) stack.push_back(root_);
    while (!stack.empty()) {
      const Node& n = nodes_[stack.back()];
      stack.pop_back();
      out.emplace_back(n.lo, n.hi, n.prio);
      if (n.right >= 0) stack.push_back(n.right);
      if (n.left >= 0) stack.push_back(n.left);
    }
    return out;
  }

  // Replace the contents by sorted disjoint intervals with given priorities (pickle restore). disjoint=false
  // only asks for strictly increasing starts (tests of the queries on overlapping intervals).
  void load(I64Array los, I64Array his, U64Array prios, uint64_t rng_state, bool disjoint) {
    const size_t n = static_cast<size_t>(los.shape(0));
    if (los.ndim() != 1 || his.ndim() != 1 || prios.ndim() != 1 || static_cast<size_t>(his.shape(0)) != n ||
        static_cast<size_t>(prios.shape(0)) != n)
      throw py::value_error("load: los, his and prios must be 1-D arrays of the same length");
    NodeVec all(n);
    for (size_t i = 0; i < n; ++i) {
      all[i] = {los.data()[i], his.data()[i], his.data()[i], prios.data()[i], -1, -1};
      if (all[i].hi < all[i].lo || (i > 0 && all[i].lo <= (disjoint ? all[i - 1].hi : all[i - 1].lo)))
        throw py::value_error(std::string("load: intervals must be valid, ") +
                              (disjoint ? "sorted and disjoint" : "sorted by strictly increasing start") +
                              "; bad interval " + fmt(all[i].lo, all[i].hi));
    }
    build(std::move(all));
    rng_ = rng_state;
    disjoint_ = disjoint;
  }

  // Raise RuntimeError unless the tree is a valid treap with exact max_end fields: in-order lo increasing
  // and (if disjoint) each lo > the previous hi, every parent outranks its children, max_end = max(hi,
  // children's max_end) at every node, size = reachable nodes = slots in use. O(n).
  void check_invariants(bool disjoint) const {
    auto fail = [](const std::string& what) { throw std::runtime_error("IntervalSet invariant broken: " + what); };
    auto in_range = [&](int32_t i) { return i >= -1 && i < static_cast<int32_t>(nodes_.size()); };
    if (!in_range(root_)) fail("root index " + std::to_string(root_) + " out of range");
    std::vector<int32_t> stack;
    size_t count = 0;
    const Node* prev = nullptr;
    int32_t t = root_;
    while (t >= 0 || !stack.empty()) {
      for (; t >= 0; t = nodes_[t].left) {
        if (stack.size() > nodes_.size()) fail("cycle in the tree");
        stack.push_back(t);
      }
      t = stack.back();
      stack.pop_back();
      const Node& n = nodes_[t];
      if (++count > nodes_.size()) fail("cycle in the tree");
      if (!in_range(n.left) || !in_range(n.right)) fail("child index out of range at node " + fmt(n.lo, n.hi));
      if (n.hi < n.lo) fail("invalid interval " + fmt(n.lo, n.hi));
      if (prev && n.lo <= prev->lo) fail("BST order: " + fmt(n.lo, n.hi) + " after " + fmt(prev->lo, prev->hi));
      if (disjoint && prev && n.lo <= prev->hi) fail("intervals " + fmt(prev->lo, prev->hi) + " and " + fmt(n.lo, n.hi) + " overlap");
      int64_t want = n.hi;
      for (int32_t c : {n.left, n.right}) {
        if (c < 0) continue;
        if (!outranks(n, nodes_[c].prio, nodes_[c].lo))
          fail("heap order: child " + fmt(nodes_[c].lo, nodes_[c].hi) + " outranks parent " + fmt(n.lo, n.hi));
        want = std::max(want, nodes_[c].max_end);
      }
      if (n.max_end != want)
        fail("max_end of " + fmt(n.lo, n.hi) + " is " + std::to_string(n.max_end) + ", expected " + std::to_string(want));
      prev = &n;
      t = n.right;
    }
    if (count != size_) fail("size " + std::to_string(size_) + " but " + std::to_string(count) + " nodes in the tree");
    if (size_ + free_.size() != nodes_.size())
      fail(std::to_string(size_) + " nodes + " + std::to_string(free_.size()) + " free slots != " +
           std::to_string(nodes_.size()) + " slots");
  }

 private:
  NodeVec nodes_;
  std::vector<int32_t> free_;
  std::vector<int32_t> path_;  // remove()'s scratch: the ancestors of the removed node
  int32_t root_ = -1;
  size_t size_ = 0;
  uint64_t rng_;
  bool disjoint_ = true;  // false only after load(disjoint=false)
  static constexpr size_t kFirstRelayout = 1 << 12;  // below this the nodes stay in cache anyway
  size_t relayout_at_ = kFirstRelayout;

  template <typename A>
  static std::string shape_str(const A& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + (a.ndim() == 1 ? ",)" : ")");
  }

  // Heap order on the rank (prio, lo): a total order, so prio ties cannot make the shape depend on history.
  static bool outranks(const Node& a, uint64_t prio, int64_t lo) {
    return a.prio > prio || (a.prio == prio && a.lo > lo);
  }

  void pull(int32_t t) {
    Node& n = nodes_[t];
    int64_t m = n.hi;
    if (n.left >= 0) m = std::max(m, nodes_[n.left].max_end);
    if (n.right >= 0) m = std::max(m, nodes_[n.right].max_end);
    n.max_end = m;
  }

  // The classic interval-tree query: the leftmost node (smallest lo) with hi >= lo, or -1. Invariant: the
  // answer is in t's subtree (t.max_end >= lo): in the left subtree if that holds an end >= lo, else t if it
  // ends at/after lo, else in the right subtree (whose max_end must then be >= lo).
  int32_t first_ending_at_or_after(int64_t lo) const {
    int32_t t = root_;
    if (t < 0 || nodes_[t].max_end < lo) return -1;
    for (;;) {
      const Node& n = nodes_[t];
      if (n.right >= 0) __builtin_prefetch(&nodes_[n.right]);  // overlap its miss with the left child's
      if (n.left >= 0 && nodes_[n.left].max_end >= lo)
        t = n.left;
      else if (n.hi >= lo)
        return t;
      else
        t = n.right;
    }
  }

  // The overlap of [lo, hi] with the smallest lo, or -1: every overlap ends at/after lo, so the first
  // interval that does is the answer iff it starts at/before hi.
  int32_t find(int64_t lo, int64_t hi) const {
    int32_t t = first_ending_at_or_after(lo);
    return t >= 0 && nodes_[t].lo <= hi ? t : -1;
  }

  struct Item {
    int64_t lo, hi;
    int32_t idx;  // position in the batch
  };

  // Sort by (lo, idx): one bucket pass on the top 12 significant bits of lo - min(lo), then std::sort
  // inside each (now cache-sized) bucket: ~1.4x faster than one std::sort on a million random
  // placements (66 vs 94 ms here); still O(m log m) when the keys cluster.
  static void sort_items(std::vector<Item>& a) {
    if (a.size() < 4096) {
      std::sort(a.begin(), a.end(), item_less);
      return;
    }
    auto [mn, mx] = std::minmax_element(a.begin(), a.end(), [](const Item& x, const Item& y) { return x.lo < y.lo; });
    const uint64_t base = static_cast<uint64_t>(mn->lo), range = static_cast<uint64_t>(mx->lo) - base;
    int shift = 0;
    while ((range >> shift) >= 4096) ++shift;
    const size_t nb = static_cast<size_t>(range >> shift) + 1;
    std::vector<size_t> start(nb + 1, 0);
    for (const Item& x : a) ++start[((static_cast<uint64_t>(x.lo) - base) >> shift) + 1];
    for (size_t b = 0; b < nb; ++b) start[b + 1] += start[b];
    std::vector<Item> out(a.size());
    std::vector<size_t> next(start.begin(), start.end() - 1);
    for (const Item& x : a) out[next[(static_cast<uint64_t>(x.lo) - base) >> shift]++] = x;
    for (size_t b = 0; b < nb; ++b) std::sort(out.begin() + start[b], out.begin() + start[b + 1], item_less);
    a.swap(out);
  }

  static bool item_less(const Item& x, const Item& y) { return x.lo < y.lo || (x.lo == y.lo && x.idx < y.idx); }

  // add_many's work: added[i] says whether batch interval i was added.
  void add_sorted(const int64_t* lo, const int64_t* hi, size_t m, bool* added) {
    std::vector<Item> items(m);
    for (size_t i = 0; i < m; ++i) items[i] = {lo[i], hi[i], static_cast<int32_t>(i)};
    sort_items(items);

    // 1. Which intervals are free of the current tree: sorted probes, or a linear merge with the in-order
    //    contents when the batch is large enough that rebuilding beats inserting one by one.
    const bool rebuild = m * 16 >= size_;
    NodeVec old;
    if (rebuild) old = in_order();
    std::vector<char> ok(m);  // in sorted order: free of the tree, later: accepted
    size_t j = 0;                  // merge pointer: first old node with lo > current lo
    int64_t old_reach = INT64_MIN;  // largest hi of old[0..j)
    for (size_t k = 0; k < m; ++k) {
      const Item& x = items[k];
      if (!rebuild) {
        ok[k] = find(x.lo, x.hi) < 0;
        continue;
      }
      for (; j < old.size() && old[j].lo <= x.lo; ++j) old_reach = std::max(old_reach, old[j].hi);
      ok[k] = !((j > 0 && old_reach >= x.lo) || (j < old.size() && old[j].lo <= x.hi));
    }

    // 2. Conflicts inside the batch: only survivors that chain-overlap in sorted order (a cluster) can
    //    clash. A lone survivor is accepted; a cluster is resolved greedily in batch order.
    std::vector<size_t> cluster;       // sorted positions
    std::map<int64_t, int64_t> taken;  // accepted intervals of the current cluster, lo -> hi
    int64_t reach = 0;                 // largest hi in the current cluster
    auto resolve = [&]() {
      if (cluster.size() > 1) {
        std::sort(cluster.begin(), cluster.end(), [&](size_t a, size_t b) { return items[a].idx < items[b].idx; });
        taken.clear();
        for (size_t k : cluster) {
          const Item& x = items[k];
          auto it = taken.upper_bound(x.lo);  // successor of lo; std::prev(it) is the predecessor
          ok[k] = !((it != taken.end() && it->first <= x.hi) || (it != taken.begin() && std::prev(it)->second >= x.lo));
          if (ok[k]) taken.emplace(x.lo, x.hi);
        }
      }
      cluster.clear();
    };
    for (size_t k = 0; k < m; ++k) {
      if (!ok[k]) continue;
      if (!cluster.empty() && items[k].lo > reach) resolve();
      reach = cluster.empty() ? items[k].hi : std::max(reach, items[k].hi);
      cluster.push_back(k);
    }
    resolve();

    // 3. Priorities as the one-at-a-time loop draws them: splitmix64 is counter based, so the interval
    //    accepted r-th in batch order gets mix(rng + (r + 1) * gamma).
    std::fill(added, added + m, false);
    for (size_t k = 0; k < m; ++k) added[items[k].idx] = ok[k];
    std::vector<int32_t> rank(m);
    int32_t r = 0;
    for (size_t i = 0; i < m; ++i) rank[i] = added[i] ? r++ : -1;
    const uint64_t rng0 = rng_;
    rng_ += static_cast<uint64_t>(r) * kGamma;
    auto prio_of = [&](const Item& x) { return splitmix64_mix(rng0 + static_cast<uint64_t>(rank[x.idx] + 1) * kGamma); };

    // 4. Insert in sorted order (the path stays cached), or rebuild from the merged sorted contents.
    if (!rebuild) {
      nodes_.reserve(nodes_.size() + static_cast<size_t>(r));
      for (size_t k = 0; k < m; ++k) {
        if (!ok[k]) continue;
        const Item& x = items[k];
        insert_if_free(x.lo, x.hi, prio_of(x));  // free by steps 1-2
      }
      return;
    }
    NodeVec all;
    all.reserve(old.size() + static_cast<size_t>(r));
    j = 0;
    for (size_t k = 0; k < m; ++k) {
      if (!ok[k]) continue;
      const Item& x = items[k];
      for (; j < old.size() && old[j].lo < x.lo; ++j) all.push_back(old[j]);
      all.push_back({x.lo, x.hi, x.hi, prio_of(x), -1, -1});
    }
    all.insert(all.end(), old.begin() + static_cast<std::ptrdiff_t>(j), old.end());
    build(std::move(all));
  }

  // Split subtree t into keys < key (l) and keys >= key (r), fixing max_end on the way back up.
  // Recursion depth <= tree depth.
  void split(int32_t t, int64_t key, int32_t& l, int32_t& r) {
    if (t < 0) {
      l = r = -1;
      return;
    }
    // The pull(t) below reads the child that stays: fetch it now, while the recursion runs.
    if (nodes_[t].lo < key) {
      if (nodes_[t].left >= 0) __builtin_prefetch(&nodes_[nodes_[t].left].max_end);
      l = t;
      split(nodes_[t].right, key, nodes_[t].right, r);
    } else {
      if (nodes_[t].right >= 0) __builtin_prefetch(&nodes_[nodes_[t].right].max_end);
      r = t;
      split(nodes_[t].left, key, l, nodes_[t].left);
    }
    pull(t);
  }

  // Merge two treaps where every key of a is below every key of b, fixing max_end on the way back up.
  int32_t merge(int32_t a, int32_t b) {
    if (a < 0) return b;
    if (b < 0) return a;
    if (outranks(nodes_[a], nodes_[b].prio, nodes_[b].lo)) {
      nodes_[a].right = merge(nodes_[a].right, b);
      pull(a);
      return a;
    }
    nodes_[b].left = merge(a, nodes_[b].left);
    pull(b);
    return b;
  }

  int32_t& link(int32_t parent, bool right) {
    return parent < 0 ? root_ : (right ? nodes_[parent].right : nodes_[parent].left);
  }

  // Insert node (lo, hi, prio) unless [lo, hi] overlaps the set; returns whether it did. One walk down the
  // search path of lo tests for an overlap (see the top of the file) and finds the place of the new node:
  // below the last node that outranks it. The nodes above that place gain hi in their subtrees; the
  // subtree found there is split around lo into the new node's children.
  bool insert_if_free(int64_t lo, int64_t hi, uint64_t prio) {
    int32_t t = root_, succ = -1, parent = -1, low = -1;
    // One step down the search path of lo; false if [lo, hi] overlaps the node or its left subtree.
    auto step = [&](const Node& n) {
      if (n.lo > lo) {
        succ = t;
        t = n.left;
        return true;
      }
      if (n.hi >= lo) return false;
      // In a disjoint set the left subtree ends before n.lo <= lo, so only a set loaded with
      // disjoint=false needs this test (and the prefetch that overlaps its miss with the right child's).
      if (!disjoint_) {
        if (n.right >= 0) __builtin_prefetch(&nodes_[n.right]);
        if (n.left >= 0 && nodes_[n.left].max_end >= lo) return false;
      }
      t = n.right;
      return true;
    };
    while (t >= 0 && outranks(nodes_[t], prio, lo)) {  // the nodes that stay above the new one
      const Node& n = nodes_[t];
      if (low < 0 && n.max_end < hi) low = t;  // max_end never grows going down: from here on all are < hi
      parent = t;
      if (!step(n)) return false;
    }
    const int32_t below = t;  // the subtree whose place the new node takes; the rest of the path is in it
    while (t >= 0)
      if (!step(nodes_[t])) return false;
    if (succ >= 0 && nodes_[succ].lo <= hi) return false;
    int32_t x;
    if (!free_.empty()) {
      x = free_.back();
      free_.pop_back();
    } else {
      if (nodes_.size() >= static_cast<size_t>(INT32_MAX)) throw std::length_error("IntervalSet: too many intervals");
      x = static_cast<int32_t>(nodes_.size());
      nodes_.push_back({});  // may reallocate: take no references into nodes_ before this
    }
    nodes_[x] = {lo, hi, hi, prio, -1, -1};
    // Raise max_end to hi on the nodes above the place that end below it (usually none: the stores would
    // dirty every cache line on the path).
    for (int32_t a = low; a >= 0 && a != below; a = nodes_[a].lo <= lo ? nodes_[a].right : nodes_[a].left)
      nodes_[a].max_end = hi;
    split(below, lo, nodes_[x].left, nodes_[x].right);
    pull(x);
    link(parent, parent >= 0 && nodes_[parent].lo <= lo) = x;
    if (++size_ >= relayout_at_) relayout();
    return true;
  }

  // Renumber the nodes in pre-order: a left child sits next to its parent and every subtree is contiguous,
  // so a walk touches fewer cache lines and pages (~1.3x faster growth to 1M nodes here). Done each time
  // the set doubles: O(n), amortized O(1) per insert. Only storage moves; the tree is the same.
  void relayout() {
    NodeVec out;
    out.reserve(std::max(nodes_.capacity(), size_));
    std::vector<std::pair<int32_t, int64_t>> stack;  // (old index, 2 * new index of its parent + side)
    if (root_ >= 0) stack.push_back({root_, -1});
    while (!stack.empty()) {
      auto [t, up] = stack.back();
      stack.pop_back();
      int32_t k = static_cast<int32_t>(out.size());
      out.push_back(nodes_[t]);
      if (up < 0)
        root_ = k;
      else if (up & 1)
        out[up >> 1].right = k;
      else
        out[up >> 1].left = k;
      // Nodes appended since the last relayout sit far from their parents: start their misses early.
      if (nodes_[t].right >= 0) {
        __builtin_prefetch(&nodes_[nodes_[t].right]);
        stack.push_back({nodes_[t].right, 2 * int64_t{k} + 1});
      }
      if (nodes_[t].left >= 0) {
        __builtin_prefetch(&nodes_[nodes_[t].left]);
        stack.push_back({nodes_[t].left, 2 * int64_t{k}});
      }
    }
    nodes_.swap(out);
    free_.clear();
    relayout_at_ = std::max<size_t>(kFirstRelayout, 2 * size_);
  }

  NodeVec in_order() const {
    NodeVec out;
    out.reserve(size_);
    std::vector<int32_t> stack;
    int32_t t = root_;
    while (t >= 0 || !stack.empty()) {
      for (; t >= 0; t = nodes_[t].left) stack.push_back(t);
      t = stack.back();
      stack.pop_back();
      out.push_back(nodes_[t]);
      t = nodes_[t].right;
    }
    return out;
  }

  // Rebuild from nodes sorted by lo in O(n): the stack construction of a Cartesian tree, which yields the
  // unique treap of these (key, rank) pairs. Nodes end up stored in key order. A node popped off the right
  // spine has its final subtree (its right child was popped just before it), so max_end is set then, and
  // for the nodes left on the spine at the end, bottom up.
  void build(NodeVec all) {
    nodes_ = std::move(all);
    free_.clear();
    std::vector<int32_t> spine;  // right spine of the tree built so far
    for (size_t k = 0; k < nodes_.size(); ++k) {
      int32_t x = static_cast<int32_t>(k), last = -1;
      nodes_[x].right = -1;
      while (!spine.empty() && outranks(nodes_[x], nodes_[spine.back()].prio, nodes_[spine.back()].lo)) {
        last = spine.back();
        spine.pop_back();
        pull(last);
      }
      nodes_[x].left = last;
      if (!spine.empty()) nodes_[spine.back()].right = x;
      spine.push_back(x);
    }
    for (auto it = spine.rbegin(); it != spine.rend(); ++it) pull(*it);
    root_ = spine.empty() ? -1 : spine.front();
    size_ = nodes_.size();
    relayout_at_ = std::max<size_t>(kFirstRelayout, 2 * size_);  // key order is already a local layout
  }
};

// ---- METH_FASTCALL entry points for the hot one-interval methods: f(lo, hi), self is a capsule of the
// Treap* whose context holds a reference to the Python Treap (so a kept bound method keeps it alive).
// Same arguments, results and exceptions as the pybind11 methods; ints outside int64 raise TypeError.
template <auto Method>
PyObject* fast_call(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "expected 2 arguments (lo, hi), got %zd", nargs);
    return nullptr;
  }
  int64_t v[2];
  for (int i = 0; i < 2; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);  // ints and __index__ objects (numpy ints); TypeError for floats
    if (v[i] == -1 && PyErr_Occurred()) {
      if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return nullptr;
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "interval [%R, %R] does not fit in int64", args[0], args[1]);
      return nullptr;
    }
  }
  Treap* t = static_cast<Treap*>(PyCapsule_GetPointer(capsule, nullptr));
  try {
    using R = decltype((t->*Method)(v[0], v[1]));
    if constexpr (std::is_void_v<R>) {
      (t->*Method)(v[0], v[1]);
      Py_RETURN_NONE;
    } else if constexpr (std::is_same_v<R, bool>) {
      return PyBool_FromLong((t->*Method)(v[0], v[1]));
    } else {
      return (t->*Method)(v[0], v[1]).release().ptr();
    }
  } catch (py::builtin_exception& e) {  // py::value_error, py::key_error
    e.set_error();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (std::length_error& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

template <auto Method>
PyMethodDef fast_def(const char* name) {
  return {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_call<Method>)), METH_FASTCALL,
          nullptr};
}

PyMethodDef kFastDefs[] = {
    fast_def<&Treap::add_if_free>("add_if_free"), fast_def<&Treap::add>("add"),
    fast_def<&Treap::overlaps>("overlaps"),       fast_def<&Treap::find_overlap>("find_overlap"),
    fast_def<&Treap::remove>("remove"),
};

// {name: builtin} for the methods above, bound to this Treap.
py::dict fast_methods(py::object self) {
  PyObject* cap = PyCapsule_New(self.cast<Treap*>(), nullptr,
                                [](PyObject* c) { Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(c))); });
  if (!cap) throw py::error_already_set();
  py::object owner = py::reinterpret_steal<py::object>(cap);  // drops our reference on exit
  PyCapsule_SetContext(cap, self.inc_ref().ptr());
  py::dict out;
  for (PyMethodDef& def : kFastDefs) {
    PyObject* f = PyCFunction_NewEx(&def, cap, nullptr);  // takes its own reference to the capsule
    if (!f) throw py::error_already_set();
    out[def.ml_name] = py::reinterpret_steal<py::object>(f);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_interval_set, m) {
  m.doc() = "C++ treap backend of nanolab.insertion.IntervalSet (see nanolab/insertion/interval_set.py)";
  py::class_<Treap>(m, "Treap")
      .def(py::init<uint64_t>())
      .def("__len__", &Treap::size)
      .def("find_overlap", &Treap::find_overlap)
      .def("overlaps", &Treap::overlaps)
      .def("add_if_free", &Treap::add_if_free)
      .def("add", &Treap::add)
      .def("remove", &Treap::remove)
      .def("add_many", &Treap::add_many)
      .def("depth", &Treap::depth)
      .def("arrays", &Treap::arrays)
      .def("structure", &Treap::structure)
      .def("rng_state", &Treap::rng_state)
      .def("load", &Treap::load, py::arg("los"), py::arg("his"), py::arg("prios"), py::arg("rng_state"),
           py::arg("disjoint") = true)
      .def("check_invariants", &Treap::check_invariants, py::arg("disjoint") = true)
      .def("fast_methods", &fast_methods);
}
