"""Page pool: which KV pages are free, used or cached, and the prefix tree over full pages.

Owns page reference counts, the prefix tree and LRU eviction. Pure stdlib: must not import torch
(tests drive it thousands of times against a brute-force reference).

Every page is in exactly one of three states:
  free    refcount 0, not in the tree            (on the free list)
  used    refcount > 0 (referenced by that many running sequences; may or may not be in the tree)
  cached  refcount 0, in the tree                (its KV is kept for a future prefix hit)
so num_free + num_used + num_cached == num_pages.

The prefix tree holds FULL pages only. A node is keyed by (parent page id, the page's tokens):
the parent id chains the whole prefix (two pages with equal tokens but different prefixes are
different nodes), and the dict compares the token tuple itself, so a hash collision can never
hand out wrong KV. Root children use parent -1. A cached page may be evicted (returned to the
free list) only when it has no children in the tree, so eviction eats leaves first; among those,
the least recently released goes first.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Iterable

ROOT = -1


class PagePool:
    """Fixed-size pages with reference counts and a prefix tree of full pages."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        # Per-page ints live in arrays, not lists: the garbage collector does not walk them (a full
        # collection walks every list slot, and there are hundreds of thousands of pages).
        self._refcount = array("i", bytes(4 * num_pages))
        # Pop from the end; reversed so page 0 is handed out first (easier to read in tests).
        self._free = array("i", range(num_pages - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * num_pages
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_pages  # tree key, None if not in tree
        self._num_children = array("i", bytes(4 * num_pages))
        self._tree: dict[tuple[int, tuple[int, ...]], int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached leaves, least recent first
        self._num_used = 0

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_cached(self) -> int:
        return self.num_pages - len(self._free) - self._num_used

    @property
    def num_available(self) -> int:
        """Pages an allocation can get now: free ones plus every cached one (leaves go first)."""
        return self.num_pages - self._num_used

    def refcount(self, page_id: int) -> int:
        return self._refcount[page_id]

    def in_tree(self, page_id: int) -> bool:
        return self._key[page_id] is not None

    # ---- allocation and references ------------------------------------------------------------

    def allocate(self) -> int | None:
        """A fresh page with refcount 1, evicting the least recently used cached leaf if needed."""
        if not self._free and not self._evict_one():
            return None
        page = self._free.pop()
        self._is_free[page] = 0
        self._refcount[page] = 1
        self._num_used += 1
        return page

    def incref(self, page_id: int) -> None:
        if self._is_free[page_id]:
            raise AssertionError(f"incref of free page {page_id}")
        if self._refcount[page_id] == 0:
            self._evictable.pop(page_id, None)   # cached -> used
            self._num_used += 1
        self._refcount[page_id] += 1

    def incref_all(self, page_ids: Iterable[int]) -> None:
        """incref of each page in turn (a prefix-cache hit's pages: most are held by other sequences
        already, and those only count up)."""
        refcount = self._refcount
        for page_id in page_ids:
            count = refcount[page_id]
            if count > 0:
                refcount[page_id] = count + 1
            else:
                self.incref(page_id)

    def decref(self, page_id: int) -> None:
        if self._refcount[page_id] <= 0:
            raise AssertionError(f"decref of unreferenced page {page_id}")
        self._refcount[page_id] -= 1
        if self._refcount[page_id]:
            return
        self._num_used -= 1
        if self._key[page_id] is None:
            self._free.append(page_id)
            self._is_free[page_id] = 1
        elif self._num_children[page_id] == 0:
            self._evictable[page_id] = None      # most recently released: evicted last

    def decref_all(self, page_ids: Iterable[int]) -> None:
        """decref of each page in turn (a sequence's table; most of its pages are shared, and those
        only count down)."""
        refcount = self._refcount
        for page_id in page_ids:
            count = refcount[page_id]
            if count > 1:
                refcount[page_id] = count - 1
            else:
                self.decref(page_id)

    def _evict_one(self) -> bool:
        if not self._evictable:
            return False
        page, _ = self._evictable.popitem(last=False)
        key = self._key[page]
        assert key is not None
        del self._tree[key]
        self._key[page] = None
        parent = key[0]
        if parent != ROOT:
            self._num_children[parent] -= 1
            if self._num_children[parent] == 0 and self._refcount[parent] == 0:
                # The parent was released no later than its child, so it is at least as old: front.
                self._evictable[parent] = None
                self._evictable.move_to_end(parent, last=False)
        self._free.append(page)
        self._is_free[page] = 1
        return True

    # ---- prefix tree --------------------------------------------------------------------------

    def match(self, token_ids: tuple[int, ...] | list[int], max_pages: int) -> list[int]:
        """The pages of the longest cached prefix of `token_ids` (full pages only, at most max_pages).

        Does not take references: the caller increfs what it keeps.
        """
        ps = self.page_size
        pages: list[int] = []
        parent = ROOT
        for i in range(min(max_pages, len(token_ids) // ps)):
            page = self._tree.get((parent, tuple(token_ids[i * ps:(i + 1) * ps])))
            if page is None:
                break
            pages.append(page)
            parent = page
        return pages

    def publish(self, parent_page: int, token_ids: tuple[int, ...], page_id: int) -> int:
        """Insert full page `page_id` (holding `token_ids`, after `parent_page` or ROOT) into the tree.

        Returns the canonical page for that content: `page_id` itself, or an existing node with the
        same prefix and tokens, in which case the caller should switch to it and drop its own copy.
        """
        if len(token_ids) != self.page_size:
            raise AssertionError(f"publishing a page of {len(token_ids)} tokens (page size {self.page_size})")
        if self._refcount[page_id] <= 0:
            raise AssertionError(f"publishing unreferenced page {page_id}")
        if parent_page != ROOT and self._key[parent_page] is None:
            raise AssertionError(f"publishing page {page_id} under page {parent_page}, which is not in the tree")
        key = (parent_page, tuple(token_ids))
        existing = self._tree.get(key)
        if existing is not None:
            return existing
        if self._key[page_id] is not None:
            raise AssertionError(f"page {page_id} is already in the tree under another key")
        self._tree[key] = page_id
        self._key[page_id] = key
        if parent_page != ROOT:
            self._num_children[parent_page] += 1
        return page_id

    # ---- invariants ---------------------------------------------------------------------------

    def check(self, expected_refcounts: dict[int, int]) -> None:
        """Raise AssertionError unless the pool agrees with the references the scheduler knows of."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        children = [0] * self.num_pages
        for key, page in self._tree.items():
            assert self._key[page] == key, f"tree key of page {page} disagrees with its node"
            assert page not in free, f"page {page} is both free and in the tree"
            parent = key[0]
            if parent != ROOT:
                assert self._key[parent] is not None, f"page {page}'s parent {parent} is not in the tree"
                children[parent] += 1
        num_used = 0
        for page in range(self.num_pages):
            rc = self._refcount[page]
            want = expected_refcounts.get(page, 0)
            assert rc == want, f"page {page}: refcount {rc} but {want} sequences reference it"
            assert bool(self._is_free[page]) == (page in free), f"page {page}: free flag disagrees with free list"
            if rc:
                num_used += 1
                assert page not in free, f"page {page} is free but referenced {rc} times"
            elif self._key[page] is None:
                assert page in free, f"page {page} is unreferenced, not cached and not free (leaked)"
            assert children[page] == self._num_children[page], f"page {page}: child count is wrong"
            leaf_cached = rc == 0 and self._key[page] is not None and children[page] == 0
            assert leaf_cached == (page in self._evictable), f"page {page}: evictable set is wrong"
        assert num_used == self._num_used, "used-page counter drifted"
        assert self.num_free + self.num_used + self.num_cached == self.num_pages
        assert sum(1 for p in range(self.num_pages) if self._key[p] is not None) == len(self._tree)


__all__ = ["PagePool", "ROOT"]
