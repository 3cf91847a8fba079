"""Paged KV blocks: allocation, free, prefix caching by chained block hashes.

The block manager owns the physical block ids of one instance. A request's KV
lives in a list of blocks (its block table); block `i` holds the KV of tokens
`[i*block_size, (i+1)*block_size)`.

Prefix caching: once a block is full and computed, it is registered under a hash
chained from its parent's hash and its own token ids, so two requests with a
common prefix share the blocks of that prefix. A hit is confirmed by comparing
token ids (a hash collision must never serve wrong KV). A freed block keeps its
hash and sits in an LRU free list; it is reused for new content only when it is
the least recently freed, so a request resumed after preemption, or a new turn
of a conversation, usually finds its prefix still there.

Free list: blocks holding nothing reusable (no hash) are reused first, most
recently freed first; then hashed blocks, least recently freed first. A free
block's hash never changes, so the list is two parts kept apart: a stack of
unhashed blocks (whole tables move on and off it in slices, which is what makes
allocating and freeing long prompts cheap) and an LRU of hashed ones.
"""

from __future__ import annotations

from collections import OrderedDict

from shunter.request import Request

_ROOT_HASH = 0x5348554E  # parent hash of a request's first block


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Allocates and frees KV blocks of one instance; never blocks, never raises on exhaustion.

    `allocate_slots` returns the newly assigned block ids or `None` when there
    are not enough free blocks; nothing changes in that case.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_token_ids: list[tuple[int, ...] | None] = [None] * num_blocks
        # The free list, in two parts (see the module docstring): unhashed blocks as a stack
        # whose last element is the next to be reused, then hashed blocks, least recently freed first.
        self.free_unhashed_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self.free_cached_ids: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block_id: dict[int, int] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}
        # Chained hashes of a request's full blocks, computed once per token prefix.
        self.req_to_block_hashes: dict[str, list[int]] = {}
        # How many of a request's leading blocks are registered in the cache.
        self.req_to_num_cached_blocks: dict[str, int] = {}

    # ---- queries -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_unhashed_ids) + len(self.free_cached_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_unhashed_ids) - len(self.free_cached_ids)

    @property
    def free_block_ids(self) -> list[int]:
        """The free blocks in reuse order (the first is the next to be overwritten); a copy."""
        return self.free_unhashed_ids[::-1] + list(self.free_cached_ids)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty if it holds none). Do not mutate."""
        return self.req_to_block_ids.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache --------------------------------------------------
    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash((parent, tuple(tokens[i * bs:(i + 1) * bs]))))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding the KV of the request's leading full blocks.

        At least one token is left uncached so the request still gets logits.
        The blocks are not yet referenced: pass them to `allocate_slots`.
        """
        if not self.enable_prefix_caching:
            return []
        num_full = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        if num_full == 0:
            return hits
        bs = self.block_size
        tokens = request.all_token_ids
        # The memo may hold one hash more (all tokens computed): never hit the last token's block.
        for i, h in enumerate(self._block_hashes(request, num_full)[:num_full]):
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.block_token_ids[block_id] != tuple(tokens[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        block_ids = self.req_to_block_ids.get(rid)
        if not block_ids:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(block_ids))
        start = self.req_to_num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(start, num_full):
            h = hashes[i]
            block_id = block_ids[i]
            if h not in self.hash_to_block_id and self.block_hashes[block_id] is None:
                self.hash_to_block_id[h] = block_id
                self.block_hashes[block_id] = h
                self.block_token_ids[block_id] = tuple(tokens[i * bs:(i + 1) * bs])
        self.req_to_num_cached_blocks[rid] = num_full

    # ---- allocation ----------------------------------------------------
    def allocate_slots(self, request_id: str, num_tokens: int, cached_block_ids: list[int] | tuple = ()) -> list[int] | None:
        """Grow the request's block table to hold `num_tokens` tokens.

        `cached_block_ids` (from `find_cached_prefix`, only for a request that
        holds no blocks yet) become its leading blocks. Returns the block ids
        added to its table, or None if there are not enough free blocks, in
        which case nothing changed.
        """
        block_ids = self.req_to_block_ids.get(request_id)
        num_needed = -(-num_tokens // self.block_size) - len(cached_block_ids)  # cdiv, inlined: a hot path
        if block_ids:
            if cached_block_ids:
                raise ValueError(f"request {request_id!r} already holds blocks; cached blocks only start a table")
            num_needed -= len(block_ids)
            if num_needed <= 0:
                return []
        # A cached block that is free must leave the free list, so it counts against it.
        num_cached_free = sum(1 for b in cached_block_ids if self.ref_counts[b] == 0) if cached_block_ids else 0
        if max(num_needed, 0) + num_cached_free > len(self.free_unhashed_ids) + len(self.free_cached_ids):
            return None
        if block_ids is None:
            block_ids = self.req_to_block_ids[request_id] = []
        if cached_block_ids:
            new_ids = self._take_cached(cached_block_ids)
            self.req_to_num_cached_blocks[request_id] = len(cached_block_ids)
            if num_needed > 0:
                new_ids += self._take_free(num_needed)
        elif num_needed > 0:
            new_ids = self._take_free(num_needed)
        else:
            new_ids = []
        block_ids.extend(new_ids)
        return new_ids

    def _take_cached(self, cached_block_ids: list[int] | tuple) -> list[int]:
        """Reference prefix-cache hits, taking the free ones off the free list."""
        refs = self.ref_counts
        for b in cached_block_ids:
            if refs[b] == 0:
                del self.free_cached_ids[b]
            refs[b] += 1
        return list(cached_block_ids)

    def _take_free(self, n: int) -> list[int]:
        """The next `n` blocks of the free list (there must be that many), referenced once, hashes dropped."""
        stack = self.free_unhashed_ids
        refs = self.ref_counts
        if n == 1 and stack:  # a decode's next block: the usual case
            b = stack.pop()
            refs[b] = 1
            return [b]
        k = min(n, len(stack))
        taken = stack[-k:] if k else []
        del stack[len(stack) - k:]
        taken.reverse()  # the top of the stack is reused first
        for _ in range(n - k):
            b, _ = self.free_cached_ids.popitem(last=False)
            self._evict(b)
            taken.append(b)
        for b in taken:
            refs[b] = 1
        return taken

    def _evict(self, block_id: int) -> None:
        h = self.block_hashes[block_id]
        if h is not None:
            if self.hash_to_block_id.get(h) == block_id:
                del self.hash_to_block_id[h]
            self.block_hashes[block_id] = None
            self.block_token_ids[block_id] = None

    def free(self, request_id: str, forget_hashes: bool = True) -> int:
        """Release every block the request holds; returns how many it held.

        Blocks are released tail first so that, among equally old cached
        blocks, the end of a sequence is overwritten before its shared prefix.
        Unhashed blocks go to the front of the free list: they hold nothing reusable.
        `forget_hashes=False` keeps the request's token hashes (it will be rescheduled).
        """
        block_ids = self.req_to_block_ids.pop(request_id, None)
        self.req_to_num_cached_blocks.pop(request_id, None)
        if forget_hashes:
            self.req_to_block_hashes.pop(request_id, None)
        if not block_ids:
            return 0
        refs = self.ref_counts
        hashes = self.block_hashes
        stack = self.free_unhashed_ids
        for b in reversed(block_ids):
            r = refs[b] - 1
            refs[b] = r
            if r == 0:
                if hashes[b] is None:
                    stack.append(b)
                else:
                    self.free_cached_ids[b] = None
        return len(block_ids)

    def rename(self, old_key, new_key) -> None:
        """Give the block table held under `old_key` (a migration's reservation) to `new_key` (its request)."""
        if new_key in self.req_to_block_ids:
            raise ValueError(f"{new_key!r} already holds blocks")
        self.req_to_block_ids[new_key] = self.req_to_block_ids.pop(old_key, [])
        num_cached = self.req_to_num_cached_blocks.pop(old_key, None)
        if num_cached is not None:
            self.req_to_num_cached_blocks[new_key] = num_cached

    def forget(self, request_id: str) -> None:
        """Drop cached per-request hash state (the request is gone for good)."""
        self.req_to_block_hashes.pop(request_id, None)

    # ---- invariants ----------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the block accounting is inconsistent."""
        refs = [0] * self.num_blocks
        for rid, block_ids in self.req_to_block_ids.items():
            assert len(set(block_ids)) == len(block_ids), f"{rid} holds a block twice"
            for b in block_ids:
                refs[b] += 1
        assert refs == self.ref_counts, "ref counts disagree with block tables"
        free = set(self.free_unhashed_ids)
        assert len(free) == len(self.free_unhashed_ids), "a block is twice in the free list"
        assert free.isdisjoint(self.free_cached_ids), "a block is in both parts of the free list"
        free.update(self.free_cached_ids)
        for b in range(self.num_blocks):
            assert (b in free) == (refs[b] == 0), f"block {b}: free list disagrees with ref count"
        assert all(self.block_hashes[b] is None for b in self.free_unhashed_ids), "hashed block among the unhashed"
        assert all(self.block_hashes[b] is not None for b in self.free_cached_ids), "unhashed block among the cached"
        assert self.num_free_blocks + sum(1 for r in refs if r > 0) == self.num_blocks, "free + used != total"
        for h, b in self.hash_to_block_id.items():
            assert self.block_hashes[b] == h, f"hash index points at block {b} holding another hash"
            assert self.block_token_ids[b] is not None
