"""The text side of a streamed request: incremental detokenisation, stop strings (which finish the
request and cut its tokens), and where a resumed request's client already is."""

from __future__ import annotations

from .request import FinishReason, Request
from .tokenizer import IncrementalDetokenizer, TokenizerLike, find_stop


class RequestText:
    """Per-request text state: incremental detokenisation and stop strings."""

    def __init__(self, req: Request, tokenizer: TokenizerLike | None, text_chars: int = 0,
                 chunks: list[int] | None = None) -> None:  # fmt: skip
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids) if tokenizer else None
        self.sent = 0  # characters of detok.text already streamed
        self.final_sent = False  # the finished delta went out
        if req.output_ids and self.detok is not None:  # resumed: the client has text_chars of this text
            at = 0
            for n in chunks or [len(req.output_ids)]:
                self.detok.push(req.output_ids[at : at + n])
                at += n
            if text_chars > len(self.detok.text):
                raise ValueError(f"resume.text_chars: {text_chars} is more than the {len(self.detok.text)} "
                                 "characters the resumed tokens make")  # fmt: skip
            self.sent = text_chars

    def delta(self, new_ids: list[int]) -> str:
        """Text delta for `new_ids` (already appended to the request). A stop string ends the request:
        the text is cut before it, and the request's tokens after the one completing it are dropped."""
        if self.detok is None:
            return ""
        self.detok.push(new_ids)
        if self.req.finished:
            self.detok.flush()
        text, stops = self.detok.text, self.req.params.stop
        end = len(text)
        if stops:
            cut = find_stop(text, stops, self.sent)
            if cut is not None:
                end = cut
                stop_end = min(cut + len(st) for st in stops if text.startswith(st, cut))
                self._trim_tokens(stop_end, len(new_ids))
                self.req.finish(FinishReason.STOP)
            elif not self.req.finished:
                end -= self.detok.holdback(stops)
        out = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def _trim_tokens(self, stop_end: int, n_new: int) -> None:
        """Keep the fewest of the last `n_new` tokens whose text reaches `stop_end` characters."""
        req = self.req
        base = len(req.output_ids) - n_new
        for j in range(1, n_new + 1):
            probe = IncrementalDetokenizer(self.detok.tokenizer, req.prompt_ids)
            probe.push(req.output_ids[: base + j])
            probe.flush()
            if len(probe.text) >= stop_end:
                del req.output_ids[base + j :]
                del req.output_logprobs[base + j :]
                req.usage.completion_tokens = len(req.output_ids)
                return
