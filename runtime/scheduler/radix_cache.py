"""Radix prefix cache (RadixAttention, as in SGLang): a radix tree over token ids whose values are
KV slot indices, so requests that share a prefix reuse its KV instead of recomputing it.

Ownership: a slot stored in the tree belongs to the tree; the scheduler hands slots in with
`insert` and gets them back through `evict` (unreferenced leaves, least recently used first) or
`reset`. A request that uses a cached path holds a reference on its last node (`lock`), which
protects the whole path to the root from eviction until `unlock`.

Sizes: `evictable_size` counts tokens on unreferenced nodes, `protected_size` tokens on referenced
ones; their sum is every slot the tree holds.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class TreeNode:
    key: list[int]  # token ids on the edge from the parent to this node
    value: list[int]  # their KV slots, same length as key
    parent: TreeNode | None
    children: dict[int, TreeNode] = field(default_factory=dict)  # by first token of the child's key
    lock_ref: int = 0
    last_access: int = 0


@dataclass
class PrefixMatch:
    slots: list[int]  # KV slots of the matched prefix
    node: TreeNode  # the node that ends exactly at the matched prefix (the root when nothing matched)


def _common_prefix_len(a: list[int], a_start: int, b: list[int]) -> int:
    """Length of the common prefix of a[a_start:] and b."""
    n = min(len(a) - a_start, len(b))
    i = 0
    while i < n and a[a_start + i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self):
        self._clock = itertools.count(1)  # logical time for LRU; deterministic, unlike wall time
        self.root = TreeNode(key=[], value=[], parent=None, lock_ref=1)
        self.evictable_size = 0
        self.protected_size = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def reset(self) -> list[int]:
        """Drop every node (only when nothing is locked); returns the slots the tree held."""
        if self.protected_size:
            raise RuntimeError(f"radix cache reset while {self.protected_size} cached tokens are in use")
        slots = self.all_slots()
        self.root = TreeNode(key=[], value=[], parent=None, lock_ref=1)
        self.evictable_size = 0
        return slots

    # ---------------------------------------------------------------------------------------
    # lookup and insertion
    # ---------------------------------------------------------------------------------------

    def match_prefix(self, key: list[int]) -> PrefixMatch:
        """Longest cached prefix of `key`. Splits the last edge when the match ends inside it, so
        the returned node ends exactly at the match and can be locked."""
        now = next(self._clock)
        node, pos, slots = self.root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(key, pos, child.key)
            child.last_access = now
            if n < len(child.key):
                child = self._split(child, n)
            slots.extend(child.value)
            node, pos = child, pos + n
        return PrefixMatch(slots=slots, node=node)

    def prefix_len(self, key: list[int]) -> int:
        """Length of the longest cached prefix of `key`, without touching the tree (for policies)."""
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(key, pos, child.key)
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def peek_prefix(self, key: list[int]) -> tuple[int, int]:
        """(length of the longest cached prefix of `key`, how many of those tokens are evictable now), without
        touching the tree: admission counts the evictable part as taken once a request locks the prefix."""
        node, pos, unlocked = self.root, 0, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common_prefix_len(key, pos, child.key)
            pos += n
            if child.lock_ref == 0:
                unlocked += n
            if n < len(child.key):
                break
            node = child
        return pos, unlocked

    def insert(self, key: list[int], value: list[int]) -> int:
        """Insert key -> value. Returns how many leading tokens were already cached: the tree keeps
        its own slots for those, so value[:returned] is not taken (the caller still owns those
        slots, unless they are the very slots the tree holds). value[returned:] is now the tree's."""
        if len(key) != len(value):
            raise ValueError(f"insert: key has {len(key)} tokens but value has {len(value)} slots")
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(key=key[pos:], value=value[pos:], parent=node, last_access=now)
                node.children[key[pos]] = new
                self.evictable_size += len(new.key)
                break
            n = _common_prefix_len(key, pos, child.key)
            child.last_access = now
            if n < len(child.key):
                child = self._split(child, n)
            node, pos = child, pos + n
        return pos

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper node (the lower keeps child)."""
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=child.parent,
                         lock_ref=child.lock_ref, last_access=child.last_access)
        upper.children[child.key[n]] = child
        child.parent.children[upper.key[0]] = upper
        child.parent = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        return upper

    # ---------------------------------------------------------------------------------------
    # references and eviction
    # ---------------------------------------------------------------------------------------

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> list[int]:
        """Remove unreferenced leaves, least recently used first, until at least num_tokens slots
        are freed or nothing evictable is left. Returns the freed slots (now the caller's)."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._evictable_leaves()]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_tokens:
            _, _, leaf = heapq.heappop(heap)
            freed.extend(leaf.value)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self.evictable_size -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _evictable_leaves(self) -> list[TreeNode]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    # ---------------------------------------------------------------------------------------
    # inspection (tests, invariants, server info)
    # ---------------------------------------------------------------------------------------

    def all_slots(self) -> list[int]:
        slots, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            slots.extend(node.value)
            stack.extend(node.children.values())
        return slots

    def check(self) -> None:
        """Structural invariants: edge keys non-empty and keyed by their first token, key/value
        lengths equal, a locked node's ancestors locked, sizes consistent."""
        evictable = protected = 0
        stack = list(self.root.children.items())
        while stack:
            first, node = stack.pop()
            assert node.key and node.key[0] == first, "radix cache: child keyed by the wrong token"
            assert len(node.key) == len(node.value), "radix cache: key/value length mismatch"
            assert node.lock_ref >= 0
            if node.lock_ref:
                protected += len(node.key)
                assert node.parent is self.root or node.parent.lock_ref > 0, "radix cache: locked node under unlocked"
            else:
                evictable += len(node.key)
            stack.extend(node.children.items())
        assert evictable == self.evictable_size, f"radix cache: evictable {self.evictable_size} != {evictable}"
        assert protected == self.protected_size, f"radix cache: protected {self.protected_size} != {protected}"
