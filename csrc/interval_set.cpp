// C++ backend of nanolab.insertion.IntervalSet: a treap of disjoint closed int64 intervals [lo, hi].
//
// Same algorithm, priorities and results as the pure-Python reference in nanolab/insertion/interval_set.py:
//   * BST on lo, max-heap on the rank (prio, lo), prio = next splitmix64 output, drawn once per created
//     node. A treap is unique given its (key, rank) pairs, so both backends build identical trees, and
//     so does add_many below, which inserts in sorted order or rebuilds instead of inserting one by one.
//   * The stored intervals are disjoint, so [lo, hi] overlaps something iff the predecessor of lo
//     (largest start <= lo) ends at/after lo, or the successor (smallest start > lo) starts at/before hi.
//     Both lie on the search path of lo, so one walk answers the query, finds the insertion point and
//     returns the overlapping interval with the smallest lo; no subtree max-end field is needed.
// Nodes live in one vector and link by int32 index (32 bytes each, two per cache line); removed slots are
// reused. The hot loops touch one node per tree level, and the tree is ~2 ln n deep.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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
  uint64_t prio;
  int32_t left, right;
};

struct Probe {
  int32_t hit = -1;     // overlapping node with the smallest lo, or -1
  int32_t parent = -1;  // a new node of the probed rank hangs below parent (-1: at the root) ...
  bool right = false;   // ... on this side
};

class Treap {
 public:
  explicit Treap(uint64_t seed) : rng_(seed) {}

  size_t size() const { return size_; }
  uint64_t rng_state() const { return rng_; }

  py::object find_overlap(int64_t lo, int64_t hi) const {
    check(lo, hi);
    int32_t t = probe(lo, hi, 0).hit;
    if (t < 0) return py::none();
    return py::make_tuple(nodes_[t].lo, nodes_[t].hi);
  }

  bool overlaps(int64_t lo, int64_t hi) const {
    check(lo, hi);
    return probe(lo, hi, 0).hit >= 0;
  }

  bool add_if_free(int64_t lo, int64_t hi) {
    check(lo, hi);
    uint64_t prio = splitmix64_mix(rng_ + kGamma);  // peek: the generator only advances on success
    Probe p = probe(lo, hi, prio);
    if (p.hit >= 0) return false;
    rng_ += kGamma;
    attach(p, lo, hi, prio);
    return true;
  }

  void add(int64_t lo, int64_t hi) {
    if (!add_if_free(lo, hi)) {
      int32_t t = probe(lo, hi, 0).hit;
      throw py::value_error("interval " + fmt(lo, hi) + " overlaps existing interval " +
                            fmt(nodes_[t].lo, nodes_[t].hi));
    }
  }

  void remove(int64_t lo, int64_t hi) {
    int32_t* link = &root_;
    while (*link >= 0 && nodes_[*link].lo != lo) link = lo < nodes_[*link].lo ? &nodes_[*link].left : &nodes_[*link].right;
    if (*link < 0 || nodes_[*link].hi != hi) throw py::key_error("interval " + fmt(lo, hi) + " not in set");
    int32_t x = *link;
    *link = merge(nodes_[x].left, nodes_[x].right);
    free_.push_back(x);
    --size_;
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
    std::vector<Node> v = in_order();
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

  // Replace the contents by sorted disjoint intervals with given priorities (pickle restore).
  void load(I64Array los, I64Array his, U64Array prios, uint64_t rng_state) {
    const size_t n = static_cast<size_t>(los.shape(0));
    if (los.ndim() != 1 || his.ndim() != 1 || prios.ndim() != 1 || static_cast<size_t>(his.shape(0)) != n ||
        static_cast<size_t>(prios.shape(0)) != n)
      throw py::value_error("load: los, his and prios must be 1-D arrays of the same length");
    std::vector<Node> all(n);
    for (size_t i = 0; i < n; ++i) {
      all[i] = {los.data()[i], his.data()[i], prios.data()[i], -1, -1};
      if (all[i].hi < all[i].lo || (i > 0 && all[i].lo <= all[i - 1].hi))
        throw py::value_error("load: intervals must be valid, sorted and disjoint; bad interval " +
                              fmt(all[i].lo, all[i].hi));
    }
    build(std::move(all));
    rng_ = rng_state;
  }

 private:
  std::vector<Node> nodes_;
  std::vector<int32_t> free_;
  int32_t root_ = -1;
  size_t size_ = 0;
  uint64_t rng_;
  static constexpr size_t kFirstRelayout = 1 << 12;  // below this the nodes stay in cache anyway
  size_t relayout_at_ = kFirstRelayout;

  template <typename A>
  static std::string shape_str(const A& a) {
    std::string s = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
    return s + (a.ndim() == 1 ? ",)" : ")");
  }

  uint64_t next_prio() { return splitmix64_mix(rng_ += kGamma); }

  // Heap order on the rank (prio, lo): a total order, so prio ties cannot make the shape depend on history.
  static bool outranks(const Node& a, uint64_t prio, int64_t lo) {
    return a.prio > prio || (a.prio == prio && a.lo > lo);
  }

  // One walk down the search path of lo: the leftmost overlap of [lo, hi] and where rank (prio, lo) goes.
  Probe probe(int64_t lo, int64_t hi, uint64_t prio) const {
    Probe p;
    int32_t pred = -1, succ = -1, parent = -1, t = root_;
    bool right = false, placed = false;
    while (t >= 0) {
      const Node& n = nodes_[t];
      if (!placed && !outranks(n, prio, lo)) {
        p.parent = parent;
        p.right = right;
        placed = true;
      }
      parent = t;
      right = n.lo <= lo;
      if (right) {
        pred = t;
        t = n.right;
      } else {
        succ = t;
        t = n.left;
      }
    }
    if (!placed) {
      p.parent = parent;
      p.right = right;
    }
    if (pred >= 0 && nodes_[pred].hi >= lo)
      p.hit = pred;
    else if (succ >= 0 && nodes_[succ].lo <= hi)
      p.hit = succ;
    return p;
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
    std::vector<Node> old;
    if (rebuild) old = in_order();
    std::vector<char> ok(m);  // in sorted order: free of the tree, later: accepted
    size_t j = 0;             // merge pointer: first old node with lo > current lo
    for (size_t k = 0; k < m; ++k) {
      const Item& x = items[k];
      if (!rebuild) {
        ok[k] = probe(x.lo, x.hi, 0).hit < 0;
        continue;
      }
      while (j < old.size() && old[j].lo <= x.lo) ++j;
      ok[k] = !((j > 0 && old[j - 1].hi >= x.lo) || (j < old.size() && old[j].lo <= x.hi));
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
        uint64_t prio = prio_of(x);
        attach(probe(x.lo, x.hi, prio), x.lo, x.hi, prio);
      }
      return;
    }
    std::vector<Node> all;
    all.reserve(old.size() + static_cast<size_t>(r));
    j = 0;
    for (size_t k = 0; k < m; ++k) {
      if (!ok[k]) continue;
      const Item& x = items[k];
      for (; j < old.size() && old[j].lo < x.lo; ++j) all.push_back(old[j]);
      all.push_back({x.lo, x.hi, prio_of(x), -1, -1});
    }
    all.insert(all.end(), old.begin() + static_cast<std::ptrdiff_t>(j), old.end());
    build(std::move(all));
  }

  int32_t& link(int32_t parent, bool right) {
    return parent < 0 ? root_ : (right ? nodes_[parent].right : nodes_[parent].left);
  }

  // Split subtree t into keys < key (l) and keys >= key (r). Recursion depth <= tree depth.
  void split(int32_t t, int64_t key, int32_t& l, int32_t& r) {
    if (t < 0) {
      l = r = -1;
    } else if (nodes_[t].lo < key) {
      l = t;
      split(nodes_[t].right, key, nodes_[t].right, r);
    } else {
      r = t;
      split(nodes_[t].left, key, l, nodes_[t].left);
    }
  }

  // Merge two treaps where every key of a is below every key of b.
  int32_t merge(int32_t a, int32_t b) {
    if (a < 0) return b;
    if (b < 0) return a;
    if (outranks(nodes_[a], nodes_[b].prio, nodes_[b].lo)) {
      nodes_[a].right = merge(nodes_[a].right, b);
      return a;
    }
    nodes_[b].left = merge(a, nodes_[b].left);
    return b;
  }

  // Hang a new node at the probed place: the subtree there is split around lo into its two children.
  void attach(const Probe& p, int64_t lo, int64_t hi, uint64_t prio) {
    int32_t x;
    if (!free_.empty()) {
      x = free_.back();
      free_.pop_back();
    } else {
      if (nodes_.size() >= static_cast<size_t>(INT32_MAX)) throw std::length_error("IntervalSet: too many intervals");
      x = static_cast<int32_t>(nodes_.size());
      nodes_.push_back({});  // may reallocate: take no references into nodes_ before this
    }
    nodes_[x] = {lo, hi, prio, -1, -1};
    int32_t& slot = link(p.parent, p.right);
    split(slot, lo, nodes_[x].left, nodes_[x].right);
    slot = x;
    if (++size_ >= relayout_at_) relayout();
  }

  // Renumber the nodes in pre-order: a left child sits next to its parent and every subtree is contiguous,
  // so a walk touches fewer cache lines and pages (~1.3x faster growth to 1M nodes here). Done each time
  // the set doubles: O(n), amortized O(1) per insert. Only storage moves; the tree is the same.
  void relayout() {
    std::vector<Node> out;
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
      if (nodes_[t].right >= 0) stack.push_back({nodes_[t].right, 2 * int64_t{k} + 1});
      if (nodes_[t].left >= 0) stack.push_back({nodes_[t].left, 2 * int64_t{k}});
    }
    nodes_.swap(out);
    free_.clear();
    relayout_at_ = std::max<size_t>(kFirstRelayout, 2 * size_);
  }

  std::vector<Node> in_order() const {
    std::vector<Node> out;
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
  // unique treap of these (key, rank) pairs. Nodes end up stored in key order.
  void build(std::vector<Node> all) {
    nodes_ = std::move(all);
    free_.clear();
    std::vector<int32_t> spine;  // right spine of the tree built so far
    for (size_t k = 0; k < nodes_.size(); ++k) {
      int32_t x = static_cast<int32_t>(k), last = -1;
      nodes_[x].left = nodes_[x].right = -1;
      while (!spine.empty() && outranks(nodes_[x], nodes_[spine.back()].prio, nodes_[spine.back()].lo)) {
        last = spine.back();
        spine.pop_back();
      }
      nodes_[x].left = last;
      if (!spine.empty()) nodes_[spine.back()].right = x;
      spine.push_back(x);
    }
    root_ = spine.empty() ? -1 : spine.front();
    size_ = nodes_.size();
    relayout_at_ = std::max<size_t>(kFirstRelayout, 2 * size_);  // key order is already a local layout
  }
};

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
      .def("load", &Treap::load);
}
