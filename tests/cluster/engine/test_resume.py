"""A request resumed on a fresh engine from the deltas it already streamed (Engine.add_request(resume=...),
what migration does when a pair dies) continues exactly as the uninterrupted run: the same tokens,
text, logprobs, finish reason and usage, greedy and seeded, in every mode."""

from __future__ import annotations

import pytest

from twotower.cluster.engine.engine import Engine
from twotower.cluster.engine.request import FinishReason, Resume

from .test_engine import P, Towers


@pytest.fixture(scope="module")
def tw() -> Towers:
    return Towers()


def stream(eng: Engine, prompt, params, resume: Resume | None = None) -> list:
    req = eng.add_request(prompt, params, resume=resume)
    deltas = []
    while eng.has_unfinished():
        deltas += [o for o in eng.step() if o.request_id == req.request_id]
    assert deltas[-1].finished and sum(o.finished for o in deltas) == 1
    return deltas


def resume_after(deltas: list, k: int) -> Resume:
    """What a client holds after the first k deltas."""
    ids = [t for o in deltas[:k] for t in o.new_token_ids]
    lps = [x for o in deltas[:k] for x in (o.logprobs or [])]
    u = deltas[k - 1].usage
    return Resume(ids, lps or None, sum(len(o.text) for o in deltas[:k]), u.denoiser_forwards, u.context_forwards,
                  [len(o.new_token_ids) for o in deltas[:k] if o.new_token_ids])  # fmt: skip


CASES = [
    ("ar", dict(mode="ar"), False),
    ("ar-sampled", dict(mode="ar", temperature=0.9, top_p=0.9, seed=7, logprobs=True), False),
    ("mock_ar", dict(mode="mock_ar"), False),
    ("diffusion", dict(mode="diffusion", block_size=4, gamma=0.3), True),
    ("diffusion-sampled", dict(mode="diffusion", block_size=4, gamma=0.3, temperature=0.7, seed=3), True),
    ("lossless", dict(mode="lossless", block_size=4, logprobs=True), True),
]


@pytest.mark.parametrize("name,spec,sharp", CASES, ids=[c[0] for c in CASES])
def test_resumed_stream_continues_the_uninterrupted_one(tw, name, spec, sharp):
    prompt, params = "def main():", P(max_tokens=18, **spec)
    full = stream(tw.engine(sharp=sharp), prompt, params)
    assert len(full) >= 3, name
    ids = [t for o in full for t in o.new_token_ids]
    text = "".join(o.text for o in full)
    seed = full[0].seed  # every delta carries the effective seed; a client resumes with it
    for k in (1, len(full) - 1):
        rest = stream(tw.engine(sharp=sharp), prompt, P(max_tokens=18, **{**spec, "seed": seed}),
                      resume_after(full, k))  # fmt: skip
        assert [t for o in full[:k] + rest for t in o.new_token_ids] == ids, (name, k)
        assert "".join(o.text for o in full[:k] + rest) == text, (name, k)
        assert rest[-1].finish_reason is full[-1].finish_reason
        assert rest[-1].usage.completion_tokens == len(ids)
        assert rest[-1].usage.prompt_tokens == full[-1].usage.prompt_tokens
        assert rest[-1].usage.context_forwards >= full[k - 1].usage.context_forwards + 1  # forwards add up
        if params.logprobs and params.mode == "ar":  # the block modes report no logprobs
            got = [x for o in full[:k] + rest for x in o.logprobs]
            want = [x for o in full for x in o.logprobs]
            assert got == pytest.approx(want, abs=1e-4)


def test_resume_keeps_looking_for_stop_strings(tw):
    prompt, spec = "Once upon a time", dict(mode="ar")
    text = "".join(o.text for o in stream(tw.engine(), prompt, P(max_tokens=30, **spec)))
    i = next(j for j in range(12, len(text) - 2) if "\ufffd" not in text[j : j + 2])
    stop = text[i : i + 2]
    params = P(max_tokens=30, stop=[stop], **spec)
    full = stream(tw.engine(), prompt, params)
    assert full[-1].finish_reason is FinishReason.STOP
    rest = stream(tw.engine(), prompt, params, resume_after(full, 6))
    assert "".join(o.text for o in full[:6] + rest) == text[:i]
    assert rest[-1].finish_reason is FinishReason.STOP
    assert [t for o in full[:6] + rest for t in o.new_token_ids] == [t for o in full for t in o.new_token_ids]


@pytest.mark.parametrize(
    "resume,params,field",
    [
        (Resume([5, 260]), P(), "resume.token_ids"),  # the vocabulary is 260
        (Resume([5] * 12), P(max_tokens=12), "resume.token_ids"),
        (Resume([5, 6], logprobs=[0.0]), P(), "resume.logprobs"),
        (Resume([70, 71], text_chars=3), P(), "resume.text_chars"),
        (Resume([70, 71], chunks=[1]), P(), "resume.chunks"),
        (Resume([70, 71], text_chars=-1), P(), "resume.text_chars"),
        (Resume("AB"), P(), "resume.token_ids"),
    ],
)
def test_bad_resume_is_a_value_error_naming_the_field(tw, resume, params, field):
    eng = tw.engine()
    with pytest.raises(ValueError, match=field):
        eng.add_request([9, 10], params, resume=resume)
    assert not eng.has_unfinished()
    assert len(stream(eng, [9, 10], P(mode="ar", max_tokens=3))) == 3  # the engine still serves

