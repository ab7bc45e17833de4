// C++ backend of nanolab.insertion.IntervalSet: a treap of disjoint closed int64 intervals [lo, hi].
//
// Same algorithm, priorities and results as the pure-Python reference in nanolab/insertion/interval_set.py:
//   * BST on lo, max-heap on the rank (prio, lo), prio = splitmix64_mix(key + lo * gamma) with
//     key = splitmix64_mix(seed + gamma): a seeded hash of lo, recomputed wherever it is needed instead of
//     stored. A treap is unique given its (key, rank) pairs, so both backends build identical trees, and the
//     tree depends only on the seed and the contents, not on the order of the calls; add_many below relies
//     on that when it inserts in sorted order or rebuilds instead of inserting one by one.
//   * Every node also stores max_end = max(hi, left.max_end, right.max_end), the largest end in its
//     subtree, kept exact by insert, split, merge, remove and the O(n) rebuilds (there are no rotations:
//     insert = split the subtree at the new node's place, remove = merge its children).
//   * find (find_overlap, overlaps, add's error) is the classic interval-tree descent: the leftmost interval
//     ending at/after lo is in the left subtree if left.max_end >= lo, else it is the node itself if
//     hi >= lo, else it is in the right subtree. Every overlap of [lo, hi] ends at/after lo, so [lo, hi]
//     overlaps the set iff that interval starts at/before hi, and then it is the overlap with the smallest lo.
//   * insert_if_free (add_if_free, add, add_many's inserts) must walk the search path of lo anyway, to find
//     the new node's place, and on the way it passes lo's predecessor (the last node where the path turns
//     right) and successor (the last left turn). In a disjoint set (every set built by add) [lo, hi] is free
//     iff pred.hi < lo and succ.lo > hi, and max_end is the end of the subtree's last interval, so an insert
//     changes max_end only at the new node, at the nodes split below it, and, when the new node ends up
//     last in their subtrees, at the trailing run of right turns above it. The walk itself reads only lo,
//     the child links and the (derived) priority. A set loaded with disjoint=false (tests of the queries on
//     overlapping intervals) takes the general walk, which also tests max_end of the left subtrees that the
//     path passes on right turns, as the Python reference does for every set.
//   * check_invariants() verifies BST order, disjointness, heap order, max_end at every node and the size.
// Nodes link by int32 index (removed slots are reused) and are split in two parallel arrays: the hot halves
// {lo, left, right} (16 bytes, four to a cache line) that the walk reads at every level, and the cold halves
// {hi, max_end} that an insert reads or writes at a few nodes. Each time the set grows by a quarter,
// relayout() renumbers the nodes so that a 256-byte aligned group of four lines holds the top of a subtree
// (up to 16 nodes: ~4 levels), and the walk prefetches a group's other three lines as soon as it enters
// one: a walk of the ~2 ln n levels then waits for about one memory latency per four levels. On the 2-core
// dev VM (whose L3 holds only a few MB: a pointer chase over 8 MB already misses) this took 1M add_if_free
// calls from Python to 0.75-0.77 s best of 5, from 0.91-1.03 s in the same window with one-line blocks of
// 4 nodes (and 1.0-1.28 s before those, with 40-byte nodes {lo, hi, max_end, prio, left, right},
// generator-drawn priorities and a pre-order layout when the set doubled).
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

// A node is split in two halves stored in two parallel arrays. The hot half is all that the walk down a
// search path reads at each level (lo to steer, lo again for the derived priority, the child links): 16
// bytes, four to a cache line, never straddling two, so a 1M-node tree's hot array (16 MB) fits the L3.
struct Hot {
  int64_t lo;
  int32_t left, right;
};
static_assert(sizeof(Hot) == 16, "Hot layout");
// The cold half: read once per insert (the predecessor's hi) and by the few max_end updates.
struct Cold {
  int64_t hi;
  int64_t max_end;  // largest hi in this node's subtree
};
static_assert(sizeof(Cold) == 16, "Cold layout");
struct Interval {
  int64_t lo, hi;
};

// Allocator for the node arrays: blocks of 2 MiB and more are 2 MiB aligned and marked MADV_HUGEPAGE, so a
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
    const size_t align = bytes < kHuge ? 256 : kHuge;  // smaller arrays: aligned to relayout's 256-byte blocks
    void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages it changes nothing
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const HugePageAllocator<U>&) const { return false; }
};
using HotVec = std::vector<Hot, HugePageAllocator<Hot>>;
using ColdVec = std::vector<Cold, HugePageAllocator<Cold>>;

class Treap {
 public:
  explicit Treap(uint64_t seed) { set_seed(seed); }

  size_t size() const { return size_; }
  uint64_t seed() const { return seed_; }

  py::object find_overlap(int64_t lo, int64_t hi) const {
    check(lo, hi);
    int32_t t = find(lo, hi);
    if (t < 0) return py::none();
    return py::make_tuple(hot_[t].lo, cold_[t].hi);
  }

  bool overlaps(int64_t lo, int64_t hi) const {
    check(lo, hi);
    return find(lo, hi) >= 0;
  }

  bool add_if_free(int64_t lo, int64_t hi) {
    check(lo, hi);
    return disjoint_ ? insert_if_free(lo, hi) : insert_if_free_general(lo, hi);
  }

  void add(int64_t lo, int64_t hi) {
    if (!add_if_free(lo, hi)) {
      int32_t t = find(lo, hi);
      throw py::value_error("interval " + fmt(lo, hi) + " overlaps existing interval " +
                            fmt(hot_[t].lo, cold_[t].hi));
    }
  }

  void remove(int64_t lo, int64_t hi) {
    path_.clear();  // ancestors of the removed node, whose max_end may shrink
    int32_t* link = &root_;
    while (*link >= 0 && hot_[*link].lo != lo) {
      path_.push_back(*link);
      link = lo < hot_[*link].lo ? &hot_[*link].left : &hot_[*link].right;
    }
    if (*link < 0 || cold_[*link].hi != hi) throw py::key_error("interval " + fmt(lo, hi) + " not in set");
    int32_t x = *link;
    *link = merge(hot_[x].left, hot_[x].right);
    free_.push_back(x);
    --size_;
    for (auto it = path_.rbegin(); it != path_.rend(); ++it) {
      const int64_t before = cold_[*it].max_end;
      pull(*it);
      if (cold_[*it].max_end == before) break;  // unchanged here, so unchanged above
    }
  }

  // Adds each interval in order if it is free (later ones see earlier ones); returns which were added.
  // Same result and tree as calling add_if_free in a loop, computed in sorted order for cache locality:
  //   1. sort the batch by lo; test each against the tree (sorted probes reuse the cached path, or a
  //      linear merge against the in-order contents when the batch is large);
  //   2. among the survivors, only intervals that chain-overlap each other (a "cluster" in sorted order)
  //      can conflict; resolve each cluster greedily in input order;
  //   3. insert the accepted ones in sorted order, or rebuild the whole treap in O(n + m) when the batch is
  //      large (priorities depend only on lo, so the order of the inserts cannot change the tree).
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
      if (hot_[t].left >= 0) stack.push_back({hot_[t].left, d + 1});
      if (hot_[t].right >= 0) stack.push_back({hot_[t].right, d + 1});
    }
    return best;
  }

  // In-order (lo, hi, prio) arrays.
  std::tuple<py::array_t<int64_t>, py::array_t<int64_t>, py::array_t<uint64_t>> arrays() const {
    std::vector<Interval> v = in_order();
    py::array_t<int64_t> los(v.size()), his(v.size());
    py::array_t<uint64_t> prios(v.size());
    for (size_t k = 0; k < v.size(); ++k) {
      los.mutable_data()[k] = v[k].lo;
      his.mutable_data()[k] = v[k].hi;
      prios.mutable_data()[k] = prio_of(v[k].lo);
    }
    return {los, his, prios};
  }

  // Pre-order (lo, hi, prio) tuples: together with the in-order this pins down the tree shape.
  std::vector<std::tuple<int64_t, int64_t, uint64_t>> structure() const {
    std::vector<std::tuple<int64_t, int64_t, uint64_t>> out;
    std::vector<int32_t> stack;
    if (root_ >= 0) stack.push_back(root_);
    while (!stack.empty()) {
      const int32_t t = stack.back();
      const Hot& n = hot_[t];
      stack.pop_back();
      out.emplace_back(n.lo, cold_[t].hi, prio_of(n.lo));
      if (n.right >= 0) stack.push_back(n.right);
      if (n.left >= 0) stack.push_back(n.left);
    }
    return out;
  }

  // Replace the contents by sorted disjoint intervals, priorities from seed (pickle restore). disjoint=false
  // only asks for strictly increasing starts (tests of the queries on overlapping intervals).
  void load(I64Array los, I64Array his, uint64_t seed, bool disjoint) {
    const size_t n = static_cast<size_t>(los.shape(0));
    if (los.ndim() != 1 || his.ndim() != 1 || static_cast<size_t>(his.shape(0)) != n)
      throw py::value_error("load: los and his must be 1-D arrays of the same length");
    std::vector<Interval> all(n);
    for (size_t i = 0; i < n; ++i) {
      all[i] = {los.data()[i], his.data()[i]};
      if (all[i].hi < all[i].lo || (i > 0 && all[i].lo <= (disjoint ? all[i - 1].hi : all[i - 1].lo)))
        throw py::value_error(std::string("load: intervals must be valid, ") +
                              (disjoint ? "sorted and disjoint" : "sorted by strictly increasing start") +
                              "; bad interval " + fmt(all[i].lo, all[i].hi));
    }
    set_seed(seed);
    build(all);
    disjoint_ = disjoint;
  }

  // Raise RuntimeError unless the tree is a valid treap with exact max_end fields: in-order lo increasing
  // and (if disjoint) each lo > the previous hi, every parent outranks its children, max_end = max(hi,
  // children's max_end) at every node, size = reachable nodes = slots in use. O(n).
  void check_invariants(bool disjoint) const {
    auto fail = [](const std::string& what) { throw std::runtime_error("IntervalSet invariant broken: " + what); };
    auto in_range = [&](int32_t i) { return i >= -1 && i < static_cast<int32_t>(hot_.size()); };
    if (!in_range(root_)) fail("root index " + std::to_string(root_) + " out of range");
    if (hot_.size() != cold_.size()) fail("hot and cold arrays differ in size");
    std::vector<int32_t> stack;
    size_t count = 0;
    int32_t prev = -1;
    int32_t t = root_;
    while (t >= 0 || !stack.empty()) {
      for (; t >= 0; t = hot_[t].left) {
        if (stack.size() > hot_.size()) fail("cycle in the tree");
        stack.push_back(t);
      }
      t = stack.back();
      stack.pop_back();
      const Hot& n = hot_[t];
      const int64_t hi = cold_[t].hi;
      if (++count > hot_.size()) fail("cycle in the tree");
      if (!in_range(n.left) || !in_range(n.right)) fail("child index out of range at node " + fmt(n.lo, hi));
      if (hi < n.lo) fail("invalid interval " + fmt(n.lo, hi));
      if (prev >= 0 && n.lo <= hot_[prev].lo)
        fail("BST order: " + fmt(n.lo, hi) + " after " + fmt(hot_[prev].lo, cold_[prev].hi));
      if (disjoint && prev >= 0 && n.lo <= cold_[prev].hi)
        fail("intervals " + fmt(hot_[prev].lo, cold_[prev].hi) + " and " + fmt(n.lo, hi) + " overlap");
      int64_t want = hi;
      for (int32_t c : {n.left, n.right}) {
        if (c < 0) continue;
        if (!outranks(t, prio_of(hot_[c].lo), hot_[c].lo))
          fail("heap order: child " + fmt(hot_[c].lo, cold_[c].hi) + " outranks parent " + fmt(n.lo, hi));
        want = std::max(want, cold_[c].max_end);
      }
      if (cold_[t].max_end != want)
        fail("max_end of " + fmt(n.lo, hi) + " is " + std::to_string(cold_[t].max_end) + ", expected " +
             std::to_string(want));
      prev = t;
      t = n.right;
    }
    if (count != size_) fail("size " + std::to_string(size_) + " but " + std::to_string(count) + " nodes in the tree");
    if (size_ + free_.size() != hot_.size())
      fail(std::to_string(size_) + " nodes + " + std::to_string(free_.size()) + " free slots != " +
           std::to_string(hot_.size()) + " slots");
  }

 private:
  HotVec hot_;    // hot_[i] and cold_[i] are the two halves of node i
  ColdVec cold_;
  std::vector<int32_t> free_;
  std::vector<int32_t> path_;  // remove()'s scratch: the ancestors of the removed node
  int32_t root_ = -1;
  size_t size_ = 0;
  uint64_t seed_ = 0, key_ = 0;  // prio(lo) = splitmix64_mix(key_ + lo * gamma), key_ = splitmix64_mix(seed_ + gamma)
  bool disjoint_ = true;  // false only after load(disjoint=false)
  static constexpr size_t kFirstRelayout = 1 << 12;  // below this the nodes stay in cache anyway
  static constexpr size_t kLine = 64 / sizeof(Hot);  // hot halves per cache line
  static constexpr size_t kBlockLines = 4;  // relayout's blocks: 256 aligned bytes, 16 hot halves
  static constexpr size_t kBlock = kBlockLines * kLine;
  // Request the other lines of t's block along with t's own, so that they all miss in parallel: one memory
  // latency per block (~4 levels) instead of one per line (~2). Every step does it (three prefetch
  // instructions, no branch); on cached lines it costs next to nothing. Addresses stay inside the
  // allocation (whole aligned blocks), and a prefetch never faults anyway.
  void prefetch_block(int32_t t) const {
    const Hot* base = hot_.data();
    for (size_t l = 1; l < kBlockLines; ++l) __builtin_prefetch(base + (static_cast<size_t>(t) ^ (l * kLine)));
  }
  size_t relayout_at_ = kFirstRelayout;

  void set_seed(uint64_t seed) {
    seed_ = seed;
    key_ = splitmix64_mix(seed + kGamma);
  }

  uint64_t prio_of(int64_t lo) const { return splitmix64_mix(key_ + static_cast<uint64_t>(lo) * kGamma); }

  template <typename A>
  static std::string shape_str(const A& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + (a.ndim() == 1 ? ",)" : ")");
  }

  // Heap order on the rank (prio, lo): a total order (and with prio a function of lo, just a shuffle of lo).
  static bool rank_gt(uint64_t pa, int64_t la, uint64_t pb, int64_t lb) { return pa > pb || (pa == pb && la > lb); }
  bool outranks(int32_t a, uint64_t prio, int64_t lo) const { return rank_gt(prio_of(hot_[a].lo), hot_[a].lo, prio, lo); }

  void pull(int32_t t) {
    const Hot& n = hot_[t];
    int64_t m = cold_[t].hi;
    if (n.left >= 0) m = std::max(m, cold_[n.left].max_end);
    if (n.right >= 0) m = std::max(m, cold_[n.right].max_end);
    cold_[t].max_end = m;
  }

  // The classic interval-tree query: the leftmost node (smallest lo) with hi >= lo, or -1. Invariant: the
  // answer is in t's subtree (t.max_end >= lo): in the left subtree if that holds an end >= lo, else t if it
  // ends at/after lo, else in the right subtree (whose max_end must then be >= lo).
  int32_t first_ending_at_or_after(int64_t lo) const {
    int32_t t = root_;
    if (t < 0 || cold_[t].max_end < lo) return -1;
    for (;;) {
      const Hot& n = hot_[t];
      if (n.right >= 0) __builtin_prefetch(&hot_[n.right]);  // overlap its miss with the left child's
      if (n.left >= 0 && cold_[n.left].max_end >= lo)
        t = n.left;
      else if (cold_[t].hi >= lo)
        return t;
      else
        t = n.right;
    }
  }

  // The overlap of [lo, hi] with the smallest lo, or -1: every overlap ends at/after lo, so the first
  // interval that does is the answer iff it starts at/before hi.
  int32_t find(int64_t lo, int64_t hi) const {
    int32_t t = first_ending_at_or_after(lo);
    return t >= 0 && hot_[t].lo <= hi ? t : -1;
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
    std::vector<Interval> old;
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
    std::fill(added, added + m, false);
    size_t r = 0;
    for (size_t k = 0; k < m; ++k) {
      added[items[k].idx] = ok[k];
      r += ok[k] != 0;
    }

    // 3. Insert in sorted order (the path stays cached), or rebuild from the merged sorted contents.
    if (!rebuild) {
      hot_.reserve(hot_.size() + r);
      cold_.reserve(cold_.size() + r);
      for (size_t k = 0; k < m; ++k)
        if (ok[k]) disjoint_ ? insert_if_free(items[k].lo, items[k].hi) : insert_if_free_general(items[k].lo, items[k].hi);
      return;
    }
    std::vector<Interval> all;
    all.reserve(old.size() + r);
    j = 0;
    for (size_t k = 0; k < m; ++k) {
      if (!ok[k]) continue;
      const Item& x = items[k];
      for (; j < old.size() && old[j].lo < x.lo; ++j) all.push_back(old[j]);
      all.push_back({x.lo, x.hi});
    }
    all.insert(all.end(), old.begin() + static_cast<std::ptrdiff_t>(j), old.end());
    build(all);
  }

  // Split subtree t into keys < key (l) and keys >= key (r), fixing max_end on the way back up. In a
  // disjoint set max_end is the end of the subtree's last interval: a node that goes right keeps its right
  // subtree and so its max_end, and one that goes left takes it from its new right child (or its own hi),
  // so only the left-going nodes' cold halves are touched. Recursion depth <= tree depth.
  void split(int32_t t, int64_t key, int32_t& l, int32_t& r) {
    if (t < 0) {
      l = r = -1;
      return;
    }
    Hot& n = hot_[t];
    if (n.lo < key) {
      if (!disjoint_ && n.left >= 0) __builtin_prefetch(&cold_[n.left]);  // pull(t) reads it
      l = t;
      split(n.right, key, n.right, r);
      if (disjoint_)
        cold_[t].max_end = n.right >= 0 ? cold_[n.right].max_end : cold_[t].hi;
      else
        pull(t);
    } else {
      if (!disjoint_ && n.right >= 0) __builtin_prefetch(&cold_[n.right]);
      r = t;
      split(n.left, key, l, n.left);
      if (!disjoint_) pull(t);
    }
  }

  // Merge two treaps where every key of a is below every key of b, fixing max_end on the way back up.
  int32_t merge(int32_t a, int32_t b) {
    if (a < 0) return b;
    if (b < 0) return a;
    if (outranks(a, prio_of(hot_[b].lo), hot_[b].lo)) {
      hot_[a].right = merge(hot_[a].right, b);
      pull(a);
      return a;
    }
    hot_[b].left = merge(a, hot_[b].left);
    pull(b);
    return b;
  }

  int32_t& link(int32_t parent, bool right) {
    return parent < 0 ? root_ : (right ? hot_[parent].right : hot_[parent].left);
  }

  // A fresh node [lo, hi] with no children. May reallocate: take no references into hot_/cold_ across it.
  int32_t new_node(int64_t lo, int64_t hi) {
    int32_t x;
    if (!free_.empty()) {
      x = free_.back();
      free_.pop_back();
      hot_[x] = {lo, -1, -1};
      cold_[x] = {hi, hi};
    } else {
      if (hot_.size() >= static_cast<size_t>(INT32_MAX)) throw std::length_error("IntervalSet: too many intervals");
      x = static_cast<int32_t>(hot_.size());
      hot_.push_back({lo, -1, -1});
      cold_.push_back({hi, hi});
    }
    return x;
  }

  // Insert [lo, hi] into a disjoint set unless it overlaps; returns whether it did. One walk down the search
  // path of lo finds the new node's place (below the last node that outranks it) and lo's predecessor and
  // successor, reading only the hot halves; [lo, hi] is free iff pred.hi < lo and succ.lo > hi (see the top
  // of the file). The max_end of an ancestor changes only if the new node becomes the last interval of its
  // subtree: those ancestors are the trailing run of right turns above the place, and only when the new
  // node gets no right subtree.
  bool insert_if_free(int64_t lo, int64_t hi) {
    const uint64_t prio = prio_of(lo);
    int32_t t = root_, parent = -1, pred = -1, succ = -1, run = -1;
    while (t >= 0) {  // the nodes that stay above the new one
      prefetch_block(t);
      const Hot& n = hot_[t];
      if (!rank_gt(prio_of(n.lo), n.lo, prio, lo)) break;
      parent = t;
      if (n.lo > lo) {
        succ = t;
        run = -1;
        t = n.left;
      } else {
        pred = t;
        if (run < 0) run = t;
        t = n.right;
      }
    }
    const int32_t below = t;  // the subtree whose place the new node takes; the rest of the path is in it
    while (t >= 0) {  // the split path: its cold halves are read or written below, so fetch them now
      prefetch_block(t);
      const Hot& n = hot_[t];
      __builtin_prefetch(&cold_[t]);
      if (n.lo > lo) {
        succ = t;
        t = n.left;
      } else {
        pred = t;
        t = n.right;
      }
    }
    if (pred >= 0 && cold_[pred].hi >= lo) return false;
    if (succ >= 0 && hot_[succ].lo <= hi) return false;
    const int32_t x = new_node(lo, hi);
    int32_t l, r;
    split(below, lo, l, r);
    hot_[x].left = l;
    hot_[x].right = r;
    if (r >= 0)
      cold_[x].max_end = cold_[r].max_end;
    else  // the new interval is the last of every subtree on the run: it raises their max_end to hi
      for (int32_t a = run; a >= 0 && a != below; a = hot_[a].right) cold_[a].max_end = hi;
    link(parent, parent >= 0 && hot_[parent].lo <= lo) = x;
    if (++size_ >= relayout_at_) relayout();
    return true;
  }

  // The same for a set loaded with disjoint=false, where intervals may nest: the overlap test also needs the
  // max_end of the left subtrees that the path passes on right turns (any of them may reach lo), and every
  // node above the place whose max_end is below hi rises to hi.
  bool insert_if_free_general(int64_t lo, int64_t hi) {
    const uint64_t prio = prio_of(lo);
    int32_t t = root_, succ = -1, parent = -1, low = -1;
    // One step down the search path of lo; false if [lo, hi] overlaps the node or its left subtree.
    auto step = [&]() {
      const Hot& n = hot_[t];
      if (n.lo > lo) {
        succ = t;
        t = n.left;
        return true;
      }
      if (cold_[t].hi >= lo) return false;
      if (n.right >= 0) __builtin_prefetch(&hot_[n.right]);  // overlap its miss with the left child's
      if (n.left >= 0 && cold_[n.left].max_end >= lo) return false;
      t = n.right;
      return true;
    };
    while (t >= 0 && outranks(t, prio, lo)) {  // the nodes that stay above the new one
      if (low < 0 && cold_[t].max_end < hi) low = t;  // max_end never grows going down: from here on all are < hi
      parent = t;
      if (!step()) return false;
    }
    const int32_t below = t;
    while (t >= 0)
      if (!step()) return false;
    if (succ >= 0 && hot_[succ].lo <= hi) return false;
    const int32_t x = new_node(lo, hi);
    for (int32_t a = low; a >= 0 && a != below; a = hot_[a].lo <= lo ? hot_[a].right : hot_[a].left)
      cold_[a].max_end = hi;
    int32_t l, r;
    split(below, lo, l, r);
    hot_[x].left = l;
    hot_[x].right = r;
    pull(x);
    link(parent, parent >= 0 && hot_[parent].lo <= lo) = x;
    if (++size_ >= relayout_at_) relayout();
    return true;
  }

  // Renumber the nodes so that a walk touches few cache lines: the tree is cut into blocks of up to 16 nodes
  // (the top of a subtree in breadth-first order: a node, its children, grandchildren, great-grandchildren
  // and one more) that each fill one 256-byte aligned group of four lines of hot halves; the walk requests
  // a block's four lines together (prefetch_block), so it pays about one memory latency per four levels.
  // A block smaller than 16 (a whole subtree of 1-15 nodes) goes into the current group only if it fits
  // there whole, else the rest of that group stays free (its slots go to the free list, and new nodes fill
  // them first). Blocks are laid out depth-first, left subtrees first, so every subtree stays contiguous
  // (pages, prefetchers). Done each time the set grows by a quarter: O(n), amortized O(1) per insert (on
  // the dev VM ~0.17 s of the ~0.75 s that 1M add_if_free calls take; relayouts at every 1.5x or 2x growth
  // cost less but leave more nodes out of place, and came out slower). Only storage moves; the tree is the same.
  void relayout() {
    HotVec hot;
    ColdVec cold;
    hot.reserve(std::max(hot_.capacity(), size_ + size_ / 2 + 16));
    cold.reserve(std::max(cold_.capacity(), size_ + size_ / 2 + 16));
    free_.clear();
    std::vector<std::pair<int32_t, int64_t>> stack;  // (old index, 2 * new index of its parent + side)
    if (root_ >= 0) stack.push_back({root_, -1});
    while (!stack.empty()) {
      auto [t, up] = stack.back();
      stack.pop_back();
      int32_t block[kBlock];
      int k = 1;
      block[0] = t;
      for (int i = 0; i < k && k < static_cast<int>(kBlock); ++i)
        for (int32_t c : {hot_[block[i]].left, hot_[block[i]].right})
          if (c >= 0 && k < static_cast<int>(kBlock)) {
            __builtin_prefetch(&hot_[c]);  // read next round: siblings' misses overlap
            __builtin_prefetch(&cold_[c]);
            block[k++] = c;
          }
      if (hot.size() % kBlock + static_cast<size_t>(k) > kBlock)
        while (hot.size() % kBlock != 0) {  // leave the rest of the block free
          free_.push_back(static_cast<int32_t>(hot.size()));
          hot.push_back({0, -1, -1});
          cold.push_back({0, 0});
        }
      const int32_t first = static_cast<int32_t>(hot.size());
      for (int i = 0; i < k; ++i) {
        hot.push_back(hot_[block[i]]);
        cold.push_back(cold_[block[i]]);
      }
      if (up < 0)
        root_ = first;
      else if (up & 1)
        hot[up >> 1].right = first;
      else
        hot[up >> 1].left = first;
      // Children inside the block get their new index now; the others start blocks of their own, pushed
      // in reverse so that they come out left to right.
      for (int i = k - 1; i >= 0; --i) {
        Hot& n = hot[first + i];
        for (int side = 1; side >= 0; --side) {
          int32_t& c = side ? n.right : n.left;
          if (c < 0) continue;
          const int32_t* at = std::find(block + 1, block + k, c);
          if (at != block + k) {
            c = first + static_cast<int32_t>(at - block);
          } else {
            __builtin_prefetch(&hot_[c]);  // nodes appended since the last relayout sit far from their parents
            __builtin_prefetch(&cold_[c]);
            stack.push_back({c, 2 * int64_t{first + i} + side});
          }
        }
      }
    }
    hot_.swap(hot);
    cold_.swap(cold);
    relayout_at_ = std::max<size_t>(kFirstRelayout, size_ + size_ / 4);
  }

  std::vector<Interval> in_order() const {
    std::vector<Interval> out;
    out.reserve(size_);
    std::vector<int32_t> stack;
    int32_t t = root_;
    while (t >= 0 || !stack.empty()) {
      for (; t >= 0; t = hot_[t].left) stack.push_back(t);
      t = stack.back();
      stack.pop_back();
      out.push_back({hot_[t].lo, cold_[t].hi});
      t = hot_[t].right;
    }
    return out;
  }

  // Rebuild from intervals sorted by lo in O(n): the stack construction of a Cartesian tree, which yields the
  // unique treap of these (key, rank) pairs. Nodes end up stored in key order. A node popped off the right
  // spine has its final subtree (its right child was popped just before it), so max_end is set then, and
  // for the nodes left on the spine at the end, bottom up.
  void build(const std::vector<Interval>& all) {
    const size_t n = all.size();
    HotVec hot(n);
    ColdVec cold(n);
    std::vector<uint64_t> prio(n);
    for (size_t k = 0; k < n; ++k) {
      hot[k] = {all[k].lo, -1, -1};
      cold[k] = {all[k].hi, all[k].hi};
      prio[k] = prio_of(all[k].lo);
    }
    hot_.swap(hot);
    cold_.swap(cold);
    free_.clear();
    std::vector<int32_t> spine;  // right spine of the tree built so far
    for (size_t k = 0; k < n; ++k) {
      int32_t x = static_cast<int32_t>(k), last = -1;
      while (!spine.empty() && rank_gt(prio[k], all[k].lo, prio[spine.back()], all[spine.back()].lo)) {
        last = spine.back();
        spine.pop_back();
        pull(last);
      }
      hot_[x].left = last;
      if (!spine.empty()) hot_[spine.back()].right = x;
      spine.push_back(x);
    }
    for (auto it = spine.rbegin(); it != spine.rend(); ++it) pull(*it);
    root_ = spine.empty() ? -1 : spine.front();
    size_ = n;
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
      .def("seed", &Treap::seed)
      .def("load", &Treap::load, py::arg("los"), py::arg("his"), py::arg("seed"),
           py::arg("disjoint") = true)
      .def("check_invariants", &Treap::check_invariants, py::arg("disjoint") = true)
      .def("fast_methods", &fast_methods);
}
