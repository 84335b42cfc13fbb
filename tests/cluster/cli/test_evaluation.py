"""`twotower eval` (twotower/cluster/evaluation.py): the prompts really come from held-out files, the quality
measures mean what the table says, and a small grid on the bundled model gives rows whose invariants hold
(AR agrees with itself, lossless with AR, mock-AR takes one denoiser forward per token)."""

from __future__ import annotations

import math

import pytest

from twotower.cluster.cli import evaluation as ev
from twotower.cluster.engine.config import EngineConfig
from twotower.cluster.engine.loading import BUNDLED_MODEL, build_engine, load_model
from twotower.towers.train.corpus import Corpus


def test_next_line_needs_the_prompt_line_closed_first():
    assert ev._next_line("\n    return x\n") == "    return x"
    assert ev._next_line(")\n    return x") is None  # the prompt's own line was continued
    assert ev._next_line("") is None


def test_prefix_fraction():
    assert ev._prefix_frac("    return x", "    return x") == 1.0
    assert ev._prefix_frac("    return y", "    return x") == 11 / 12
    assert ev._prefix_frac(None, "abc") == 0.0
    assert ev._prefix_frac("abcdef", "abc") == 1.0  # longer generations are not penalised past the line
    assert ev._prefix_frac("", "") == 1.0


def test_heldout_prompts_are_cut_from_heldout_files_only():
    corpus = Corpus.load()
    train, held = corpus.split()
    prompts = ev.heldout_prompts(6, prompt_chars=200, seed=3)
    assert len(prompts) == 6
    held_texts = [corpus.texts[i] for i in held]
    for p in prompts:
        assert len(p.text) <= 200 and len(p.next_line.strip()) >= 8
        assert any(p.text + "\n" + p.next_line + "\n" in t for t in held_texts), p.next_line
    assert ev.heldout_prompts(6, prompt_chars=200, seed=3) == prompts  # seeded


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="no bundled model")
def test_small_grid_on_the_bundled_model(tmp_path):
    engine = build_engine(load_model(BUNDLED_MODEL), EngineConfig(eager=True))
    prompts = ev.heldout_prompts(3, seed=1)
    rows = ev.evaluate(engine, prompts, ev.grid([4], [0.8], 8, few_steps=(2, 4)), speed_prompts=1,
                       log=lambda m: None)  # fmt: skip
    by = {r.label: r for r in rows}
    assert list(by) == ["AR", "lossless S=16", "lossless S=4 T=1", "lossless S=8 T=1", "lossless S=16 T=1",
                        "mock-AR", "diffusion S=4 g=0.8", "diffusion S=4 T=2 g=0.8"]  # fmt: skip
    # (T=4 is not below S=4: no row)
    ar, mock, dif = by["AR"], by["mock-AR"], by["diffusion S=4 g=0.8"]
    assert ar.ar_agree == 1.0 and ar.den_forwards == 0 and ar.tpf_ctx == 1.0
    for ll in (by["lossless S=16"], by["lossless S=4 T=1"], by["lossless S=8 T=1"], by["lossless S=16 T=1"]):
        assert ll.ar_agree == 1.0 and ll.next_line_prefix == ar.next_line_prefix  # float32 on CPU: exact
    assert by["lossless S=16 T=1"].den_forwards < by["lossless S=16"].den_forwards
    assert mock.den_forwards == mock.tokens  # one token per denoiser forward
    assert dif.tokens > 0 and dif.tpf_den >= 1.0 and (dif.block_size, dif.gamma, dif.steps) == (4, 0.8, 4)
    few = by["diffusion S=4 T=2 g=0.8"]
    assert few.steps == 2 and few.den_forwards <= 2 * few.ctx_forwards  # at most T forwards per block
    for r in rows:
        assert r.loglik < 0 and r.tok_s > 0 and 0.0 <= r.next_line_prefix <= 1.0
        assert r.cost is not None and r.cost.tokens > 0 and ev.modelled_speedup(r, ar) > 0
    assert ev.modelled_speedup(ar, ar) == 1.0 and ar.cost.towers["denoiser"].forwards == 0
    assert mock.cost.bytes_per_token > ar.cost.bytes_per_token  # both towers' weights per token
    table = ev.table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| AR |")
    assert ev.likelihood_retained(ar, ar) == 1.0 and ev.prefix_retained(ar, ar) == 1.0
    assert ev.likelihood_retained(by["lossless S=16"], ar) == 1.0
    assert abs(ev.likelihood_retained(dif, ar) - math.exp(dif.loglik - ar.loglik)) < 1e-12
    pytest.importorskip("matplotlib")
    png = tmp_path / "t.png"
    ev.plot(rows, str(png), "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
