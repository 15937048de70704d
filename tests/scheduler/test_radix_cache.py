"""Radix cache: unit tests and a property test against a plain dictionary model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.scheduler.radix_cache import RadixCache


def test_match_insert_and_split():
    cache = RadixCache()
    assert cache.insert([1, 2, 3, 4], [11, 12, 13, 14]) == 0
    assert cache.insert([1, 2, 5], [21, 22, 25]) == 2  # [1, 2] was there: the tree keeps 11, 12
    m = cache.match_prefix([1, 2, 5, 6])
    assert m.slots == [11, 12, 25]
    assert cache.match_prefix([1, 2, 3]).slots == [11, 12, 13]  # splits [3, 4]
    assert cache.match_prefix([9]).slots == [] and cache.match_prefix([9]).node is cache.root
    assert cache.prefix_len([1, 2, 3, 4, 5]) == 4
    assert cache.total_size == 5 and cache.evictable_size == 5
    cache.check()


def test_lock_protects_path_from_eviction():
    cache = RadixCache()
    cache.insert([1, 2, 3], [11, 12, 13])
    cache.insert([1, 2, 4, 5], [11, 12, 14, 15])
    node = cache.match_prefix([1, 2, 3]).node
    cache.lock(node)
    assert cache.protected_size == 3 and cache.evictable_size == 2
    assert sorted(cache.evict(100)) == [14, 15]  # only the unlocked branch goes
    assert cache.match_prefix([1, 2, 3]).slots == [11, 12, 13]
    cache.unlock(node)
    assert cache.protected_size == 0 and cache.evictable_size == 3
    assert cache.evict(1) == [13]  # stops once enough is freed
    assert sorted(cache.evict(2)) == [11, 12]  # its parent became a leaf
    assert cache.total_size == 0
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(node)


def test_eviction_is_least_recently_used_first():
    cache = RadixCache()
    cache.insert([1, 1], [1, 2])
    cache.insert([2, 2], [3, 4])
    cache.insert([3, 3], [5, 6])
    cache.match_prefix([1, 1])  # touch: now [2, 2] is the oldest
    assert cache.evict(2) == [3, 4]
    assert cache.evict(2) == [5, 6]
    assert cache.evict(2) == [1, 2]


def test_reset_refuses_while_locked():
    cache = RadixCache()
    cache.insert([1, 2], [5, 6])
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    with pytest.raises(RuntimeError, match="in use"):
        cache.reset()
    cache.unlock(node)
    assert sorted(cache.reset()) == [5, 6] and cache.total_size == 0


def test_insert_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="key has 2 tokens but value has 1"):
        RadixCache().insert([1, 2], [3])


operations = st.lists(
    st.tuples(st.sampled_from(["insert", "match", "lock", "unlock", "evict"]),
              st.lists(st.integers(0, 3), min_size=1, max_size=8), st.integers(1, 6)),
    max_size=60)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_tree_behaves_like_a_prefix_dictionary(ops):
    """Model: for every inserted sequence, each prefix maps to the slots first stored for it.
    Evicted slots leave the model; locked paths are never evicted; sizes stay consistent."""
    cache = RadixCache()
    model: dict[tuple, int] = {}  # prefix -> slot of its last token
    next_slot = 1
    locked = []  # (node, key)
    for op, key, n in ops:
        if op == "insert":
            value = list(range(next_slot, next_slot + len(key)))
            next_slot += len(key)
            existing = cache.insert(key, value)
            known = 0
            while known < len(key) and tuple(key[:known + 1]) in model:
                known += 1
            assert existing == known
            for i in range(known, len(key)):
                model[tuple(key[:i + 1])] = value[i]
        elif op == "match":
            m = cache.match_prefix(key)
            expected = []
            for i in range(len(key)):
                if tuple(key[:i + 1]) not in model:
                    break
                expected.append(model[tuple(key[:i + 1])])
            assert m.slots == expected
        elif op == "lock":
            m = cache.match_prefix(key)
            cache.lock(m.node)
            locked.append((m.node, key[:len(m.slots)]))
        elif op == "unlock" and locked:
            node, _ = locked.pop(n % len(locked))
            cache.unlock(node)
        elif op == "evict":
            freed = set(cache.evict(n))
            assert len(freed) >= n or cache.evictable_size == 0
            for prefix in [p for p, slot in model.items() if slot in freed]:
                del model[prefix]
            for _, key_locked in locked:  # locked paths survive
                for i in range(len(key_locked)):
                    assert tuple(key_locked[:i + 1]) in model
        cache.check()
        assert sorted(cache.all_slots()) == sorted(model.values())
    for node, _ in locked:
        cache.unlock(node)
    assert cache.protected_size == 0
    assert sorted(cache.evict(10**9)) == sorted(model.values())
    assert cache.total_size == 0
