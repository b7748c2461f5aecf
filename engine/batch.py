"""The flattened description of one forward step: which tokens, at which positions, reading which cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """B sequences, T new tokens in all (sequence after sequence).

    input_ids: `[T]` int64; positions: `[T]` int64; out_slots: `[T]` int64 cache slot each new token is written to.
    extend_lens / prefix_lens: per sequence, new tokens this step and tokens already cached (host ints).
    page_table: `[B, max_pages]` int64 cache pages of each sequence in order (prefix then new), 0-padded; token t
    of sequence b lives in slot `page_table[b, t // page_size] * page_size + t % page_size`. With page_size 1 (what
    `build` makes) the entries are the tokens' slots.
    seq_lens: `[B]` int64 prefix + new.
    decode: every sequence adds exactly one token (attention takes the absorbed path).
    mode: the job-wide mode of this step, "prefill" or "decode", the same on every rank (a rank may decode while
    another prefills: the step is then "prefill"); dispatchers choose their kernels by it.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    out_slots: torch.Tensor
    extend_lens: list[int]
    prefix_lens: list[int]
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    decode: bool
    mode: str = "prefill"
    page_size: int = 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.extend_lens)

    @property
    def max_seq_len(self) -> int:
        """Longest sequence after this step (host int: sizing tables needs no device sync)."""
        return max((p + n for p, n in zip(self.prefix_lens, self.extend_lens)), default=0)

    @property
    def last_token_index(self) -> torch.Tensor:
        """`[B]` int64 row of each sequence's last new token in the flattened batch."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)

    @classmethod
    def build(
        cls,
        new_tokens: list[list[int]],
        prefix_lens: list[int],
        seq_slots: list[torch.Tensor],
        device: torch.device | str,
    ) -> ForwardBatch:
        """new_tokens[b]: tokens to run for sequence b; seq_slots[b]: `[prefix + new]` cache slots of all its tokens."""
        lens = [p + len(t) for p, t in zip(prefix_lens, new_tokens)]
        table = torch.zeros(len(lens), max(lens, default=0), dtype=torch.int64)
        for b, slots in enumerate(seq_slots):
            table[b, : lens[b]] = slots[: lens[b]]
        out = [s for b, slots in enumerate(seq_slots) for s in slots[prefix_lens[b] : lens[b]].tolist()]
        return cls.assemble(new_tokens, prefix_lens, table, out, device)

    @classmethod
    def assemble(
        cls,
        new_tokens: list[list[int]],
        prefix_lens: list[int],
        page_table: torch.Tensor,
        out_slots: list[int],
        device: torch.device | str,
        page_size: int = 1,
    ) -> ForwardBatch:
        """The batch from its cache layout (page_table `[B, max_pages]` on the host, out_slots per new token) and
        tokens: flattened ids and positions, lengths, and the decode flag, moved to `device`."""
        extend = [len(t) for t in new_tokens]
        lens = [p + n for p, n in zip(prefix_lens, extend)]
        ids = [t for toks in new_tokens for t in toks]
        pos = [p + i for p, n in zip(prefix_lens, extend) for i in range(n)]
        decode = bool(extend) and all(n == 1 for n in extend) and all(p > 0 for p in prefix_lens)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(device),
            positions=torch.tensor(pos, dtype=torch.int64).to(device),
            out_slots=torch.tensor(out_slots, dtype=torch.int64).to(device),
            extend_lens=extend,
            prefix_lens=list(prefix_lens),
            page_table=page_table.to(device),
            seq_lens=torch.tensor(lens, dtype=torch.int64).to(device),
            decode=decode,
            mode="decode" if decode else "prefill",
            page_size=page_size,
        )

    @classmethod
    def graph_decode(
        cls,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        out_slots: torch.Tensor,
        page_table: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int,
        max_seq_len: int,
    ) -> ForwardBatch:
        """A decode batch over static buffers (`engine.cuda_graph`): one new token for each of B rows.

        input_ids, positions, out_slots, seq_lens: `[B]` int64; page_table: `[B, max_pages]` int64; all on the
        device, refilled in place before each replay. The host lists cannot follow the contents, so they carry the
        bound the graph serves instead: every prefix is `max_seq_len - 1`, so `max_seq_len` sizes the rotary table
        for any sequence the page table can hold. The decode forward reads lengths only from `seq_lens`.
        """
        b = input_ids.shape[0]
        return cls(input_ids=input_ids, positions=positions, out_slots=out_slots, extend_lens=[1] * b,
                   prefix_lens=[max_seq_len - 1] * b, page_table=page_table, seq_lens=seq_lens, decode=True,
                   mode="decode", page_size=page_size)

    @classmethod
    def empty(cls, device: torch.device | str, mode: str) -> ForwardBatch:
        """No tokens: what an idle rank runs so that it still joins the step's collectives."""
        batch = cls.build([], [], [], device)
        batch.mode = mode
        return batch
