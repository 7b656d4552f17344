// Native kernels of the collisionless ID map (tables/idmap.py): the per-ID hot loops.
//
// Every batch probes the cuckoo hash array once per ID, stamps the last-seen time and
// access count of every row it reads, inserts its new IDs and, when full, picks the rows to
// evict. In whole-tensor torch ops each of those is several
// passes over the batch, each a random read or write into arrays of hundreds of MB, and a
// probe round must read all three hash choices of the IDs it visits. Here one loop per
// batch hashes an ID, reads its first choice and stops at the first match, while software
// prefetches keep PREFETCH_DISTANCE IDs' cache lines in flight: the loop is bound by memory
// latency, so overlapping the misses is most of the gain.
//
// Probes and stamps split the batch over torch's intra-op threads (`at::parallel_for`,
// chunks of kGrain IDs, each with its own prefetch ring): a probe only reads, and a stamp
// writes with atomics, since two IDs of a batch may share a row. Inserts stay serial: a
// displacement chain may cross any slot, and only new IDs insert.
//
// The hash and the choice arithmetic are the ones in tables/idmap.py and recsys/hashing.py,
// bit for bit (splitmix64 finalizer of id XOR salt; choice j = h + j * ((h >> 32) | 1),
// arithmetic shift, masked to the power-of-two array), so both paths agree on every slot.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChoices = 3;
constexpr int64_t kPrefetchDistance = 16;
constexpr int64_t kGrain = 8192;  // IDs per thread's chunk: well above the prefetch lead

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The hash and first choice's step of an ID, as idmap.py's `_hashes` and `_choice`.
struct Hashed {
  uint64_t first;
  uint64_t step;
};

inline Hashed hashed(int64_t id, int64_t salt) {
  const auto h = static_cast<int64_t>(mix64(static_cast<uint64_t>(id ^ salt)));
  return {static_cast<uint64_t>(h), static_cast<uint64_t>((h >> 32) | 1)};
}

void check_map(const at::Tensor& keys, const at::Tensor& vals) {
  TORCH_CHECK(keys.dtype() == at::kLong && vals.dtype() == at::kInt, "keys int64, vals int32");
  TORCH_CHECK(keys.is_contiguous() && vals.is_contiguous(), "map arrays must be contiguous");
  TORCH_CHECK(keys.numel() == vals.numel(), "keys and vals differ in size");
  const int64_t n = keys.numel();
  TORCH_CHECK(n > 0 && (n & (n - 1)) == 0, "the hash array must be a power of two");
}

// Row slot of each ID, -1 where absent; `salt` is the map's hash64 salt.
at::Tensor probe(const at::Tensor& keys, const at::Tensor& vals, const at::Tensor& ids,
                 int64_t salt) {
  check_map(keys, vals);
  TORCH_CHECK(ids.dtype() == at::kLong && ids.dim() == 1, "ids must be 1-D int64");
  const auto flat = ids.contiguous();
  const int64_t n = flat.numel();
  auto slots = at::empty({n}, flat.options());
  const int64_t* id = flat.data_ptr<int64_t>();
  const int64_t* key = keys.data_ptr<int64_t>();
  const int32_t* val = vals.data_ptr<int32_t>();
  int64_t* out = slots.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(keys.numel() - 1);

  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    Hashed ring[kPrefetchDistance];
    const int64_t lead = std::min(end, begin + kPrefetchDistance);
    for (int64_t i = begin; i < lead; ++i) {
      ring[i % kPrefetchDistance] = hashed(id[i], salt);
      __builtin_prefetch(key + (ring[i % kPrefetchDistance].first & mask));
      __builtin_prefetch(val + (ring[i % kPrefetchDistance].first & mask));
    }
    for (int64_t i = begin; i < end; ++i) {
      const Hashed h = ring[i % kPrefetchDistance];
      const int64_t ahead = i + kPrefetchDistance;
      if (ahead < end) {
        const Hashed next = hashed(id[ahead], salt);
        ring[ahead % kPrefetchDistance] = next;
        __builtin_prefetch(key + (next.first & mask));
        __builtin_prefetch(val + (next.first & mask));
      }
      int64_t slot = -1;
      for (int64_t j = 0; j < kChoices; ++j) {
        const uint64_t pos = (h.first + static_cast<uint64_t>(j) * h.step) & mask;
        if (key[pos] == id[i] && val[pos] >= 0) {
          slot = val[pos];
          break;
        }
      }
      out[i] = slot;
    }
  });
  return slots;
}

// Cuckoo-insert distinct absent IDs with their rows: each takes its first free choice, else
// displaces the occupant of one of its choices (never the one it was just pushed out of,
// picked by a seeded xorshift, so a replay is deterministic), and the occupant goes on.
// Keeps `row_pos` (hash slot of each row) current. False once a chain passes `max_kicks`
// displacements: the caller rebuilds the array from its live rows with a new seed.
bool insert(at::Tensor keys, at::Tensor vals, at::Tensor row_pos, const at::Tensor& ids,
            const at::Tensor& rows, int64_t salt, int64_t max_kicks) {
  check_map(keys, vals);
  TORCH_CHECK(row_pos.dtype() == at::kLong && row_pos.is_contiguous(), "row_pos int64");
  TORCH_CHECK(ids.dtype() == at::kLong && rows.dtype() == at::kLong, "int64 ids and rows");
  TORCH_CHECK(ids.numel() == rows.numel(), "one row per ID");
  const auto id_flat = ids.contiguous();
  const auto row_flat = rows.contiguous();
  const int64_t n = id_flat.numel();
  const int64_t* new_id = id_flat.data_ptr<int64_t>();
  const int64_t* new_row = row_flat.data_ptr<int64_t>();
  int64_t* key = keys.data_ptr<int64_t>();
  int32_t* val = vals.data_ptr<int32_t>();
  int64_t* pos_of_row = row_pos.data_ptr<int64_t>();
  const int64_t num_rows = row_pos.numel();
  const uint64_t mask = static_cast<uint64_t>(keys.numel() - 1);
  uint64_t rng = mix64(static_cast<uint64_t>(salt)) | 1;

  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(new_row[i] >= 0 && new_row[i] < num_rows, "row ", new_row[i], " out of range");
    if (i + kPrefetchDistance < n) {
      const Hashed ahead = hashed(new_id[i + kPrefetchDistance], salt);
      __builtin_prefetch(val + (ahead.first & mask), 1);
      __builtin_prefetch(key + (ahead.first & mask), 1);
    }
    int64_t id = new_id[i];
    int64_t row = new_row[i];
    uint64_t pushed_from = ~uint64_t{0};
    for (int64_t kicks = 0;; ++kicks) {
      const Hashed h = hashed(id, salt);
      uint64_t choice[kChoices];
      int64_t free_at = -1;
      for (int64_t j = 0; j < kChoices; ++j) {
        choice[j] = (h.first + static_cast<uint64_t>(j) * h.step) & mask;
        if (free_at < 0 && val[choice[j]] < 0) {
          free_at = j;
        }
      }
      if (free_at >= 0) {
        key[choice[free_at]] = id;
        val[choice[free_at]] = static_cast<int32_t>(row);
        pos_of_row[row] = static_cast<int64_t>(choice[free_at]);
        break;
      }
      if (kicks == max_kicks) {
        return false;  // `id` holds a live row but no hash slot until the rebuild
      }
      uint64_t target;
      do {  // choices are distinct (odd step), so at most one is where `id` came from
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        target = choice[rng % kChoices];
      } while (target == pushed_from);
      const int64_t held_id = key[target];
      const int64_t held_row = val[target];
      key[target] = id;
      val[target] = static_cast<int32_t>(row);
      pos_of_row[row] = static_cast<int64_t>(target);
      id = held_id;
      row = held_row;
      pushed_from = target;
    }
  }
  return true;
}

// Stamp `times` (one per slot, or one for all) into `last_seen` (keeping the latest) and
// count one access in `counts`, for every slot >= 0; in place.
void touch(at::Tensor last_seen, at::Tensor counts, const at::Tensor& slots,
           const at::Tensor& times) {
  TORCH_CHECK(last_seen.dtype() == at::kLong && counts.dtype() == at::kLong,
              "last_seen and counts must be int64");
  TORCH_CHECK(last_seen.is_contiguous() && counts.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(slots.dtype() == at::kLong && times.dtype() == at::kLong, "int64 slots, times");
  const auto flat = slots.contiguous();
  const auto when = times.contiguous();
  const int64_t n = flat.numel();
  TORCH_CHECK(when.numel() == 1 || when.numel() == n, "one time, or one per slot");
  const int64_t rows = last_seen.numel();
  TORCH_CHECK(counts.numel() == rows, "last_seen and counts differ in size");
  const int64_t* slot = flat.data_ptr<int64_t>();
  const int64_t* time = when.data_ptr<int64_t>();
  const bool per_slot = when.numel() == n && n != 1;
  int64_t* seen = last_seen.data_ptr<int64_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] < rows, "slot ", slot[i], " beyond ", rows, " rows");
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ahead = i + kPrefetchDistance;
      if (ahead < end && slot[ahead] >= 0) {
        __builtin_prefetch(seen + slot[ahead], 1);
        __builtin_prefetch(count + slot[ahead], 1);
      }
      const int64_t s = slot[i];
      if (s < 0) {
        continue;
      }
      const int64_t t = per_slot ? time[i] : time[0];
      if (per_slot) {  // keep the latest time: a compare-and-swap loop on the row's stamp
        int64_t held = __atomic_load_n(seen + s, __ATOMIC_RELAXED);
        while (t > held && !__atomic_compare_exchange_n(seen + s, &held, t, true,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        }
      } else {
        __atomic_store_n(seen + s, t, __ATOMIC_RELAXED);
      }
      __atomic_fetch_add(count + s, 1, __ATOMIC_RELAXED);
    }
  });
}

// The `target` live rows not in `protect` that are lowest by (scores..., slot), as
// idmap.py's `_lowest` picks them: per score, the rows below its target-th smallest value,
// then the tie group goes on to the next score; the last group is cut by lowest slot.
// Returned in ascending slot order. One pass to gather candidates, nth_element per score.
at::Tensor lowest(const at::Tensor& live, const at::Tensor& protect, at::TensorList scores,
                  int64_t target) {
  TORCH_CHECK(live.dtype() == at::kBool && live.is_contiguous(), "live must be bool");
  TORCH_CHECK(protect.dtype() == at::kLong, "protect must be int64");
  const int64_t rows_total = live.numel();
  const bool* is_live = live.data_ptr<bool>();
  std::vector<uint8_t> blocked(static_cast<size_t>(rows_total), 0);
  const auto guarded = protect.contiguous();
  const int64_t* guard = guarded.data_ptr<int64_t>();
  for (int64_t i = 0; i < guarded.numel(); ++i) {
    if (guard[i] >= 0 && guard[i] < rows_total) {
      blocked[guard[i]] = 1;
    }
  }
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < rows_total; ++r) {
    if (is_live[r] && !blocked[r]) {
      rows.push_back(r);
    }
  }
  target = std::min<int64_t>(std::max<int64_t>(target, 0), rows.size());
  std::vector<int64_t> chosen;
  chosen.reserve(static_cast<size_t>(target));
  std::vector<int64_t> values;
  for (const auto& score : scores) {
    if (target == 0 || target == static_cast<int64_t>(rows.size())) {
      break;
    }
    TORCH_CHECK(score.dtype() == at::kLong && score.is_contiguous() &&
                    score.numel() == rows_total,
                "scores must be contiguous int64, one per row");
    const int64_t* value = score.data_ptr<int64_t>();
    values.resize(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      values[i] = value[rows[i]];
    }
    std::nth_element(values.begin(), values.begin() + (target - 1), values.end());
    const int64_t kth = values[target - 1];
    const size_t before = chosen.size();
    std::vector<int64_t> ties;
    for (const int64_t r : rows) {
      if (value[r] < kth) {
        chosen.push_back(r);
      } else if (value[r] == kth) {
        ties.push_back(r);
      }
    }
    target -= static_cast<int64_t>(chosen.size() - before);
    rows.swap(ties);
  }
  chosen.insert(chosen.end(), rows.begin(), rows.begin() + target);
  std::sort(chosen.begin(), chosen.end());
  auto out = at::empty({static_cast<int64_t>(chosen.size())}, at::kLong);
  std::copy(chosen.begin(), chosen.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY(recsys_idmap, m) {
  m.def("probe(Tensor keys, Tensor vals, Tensor ids, int salt) -> Tensor");
  m.def(
      "insert(Tensor(a!) keys, Tensor(b!) vals, Tensor(c!) row_pos, Tensor ids, Tensor rows, "
      "int salt, int max_kicks) -> bool");
  m.def("lowest(Tensor live, Tensor protect, Tensor[] scores, int target) -> Tensor");
  m.def("touch(Tensor(a!) last_seen, Tensor(b!) counts, Tensor slots, Tensor times) -> ()");
}

TORCH_LIBRARY_IMPL(recsys_idmap, CPU, m) {
  m.impl("probe", &probe);
  m.impl("insert", &insert);
  m.impl("lowest", &lowest);
  m.impl("touch", &touch);
}

// An importable module, so `import tables.collisionless._idmap_native` loads the library and its ops.
extern "C" PyObject* PyInit__idmap_native(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_idmap_native", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
