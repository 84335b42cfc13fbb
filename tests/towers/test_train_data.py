"""Training data and machinery: corpus file rules, hash and held-out split; the BPE's fixed special ids (and
that the serving Tokenizer reads them); windows; the LR schedule and its re-planning; MoE balancing."""

from __future__ import annotations

import torch

from twotower.cluster.engine.tokenizer import Tokenizer
from twotower.towers.config import preset
from twotower.towers.context import ContextTower
from twotower.towers.train import tokenizer as T
from twotower.towers.train.common import Budget, OptimConfig, RouterBalancer, init_for_training_, wsd_lr
from twotower.towers.train.corpus import Corpus, is_heldout, random_windows, sequential_windows, token_stream


def _fake_stdlib(root):
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "def dumps(x):\n    return str(x)\n",
        "test/test_os.py": "def test():\n    pass\n",
        "site-packages/foo/bar.py": "x = 1\n",
        "__pycache__/os.py": "junk\n",
        "encodings/cp1252.py": "table = ()\n",
        "pydoc_data/topics.py": "topics = {}\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "x = 2\n",
        "big.py": "#" * (300 * 1024) + "\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8


def test_corpus_file_rules_and_hash(tmp_path):
    _fake_stdlib(tmp_path)
    c = Corpus.load(tmp_path)
    assert c.files == ["json/__init__.py", "os.py", "test/test_os.py"]
    assert sorted(c.skipped) == ["big.py", "latin1.py"]
    h = c.sha256
    assert Corpus.load(tmp_path).sha256 == h  # deterministic
    (tmp_path / "os.py").write_text("import sys  \n")
    assert Corpus.load(tmp_path).sha256 != h  # content is hashed
    train, held = c.split()
    assert sorted(train + held) == [0, 1, 2]
    assert all(is_heldout(c.files[i]) for i in held) and not any(is_heldout(c.files[i]) for i in train)


def test_heldout_split_is_about_three_percent():
    names = [f"pkg/mod_{i}.py" for i in range(20000)]
    frac = sum(map(is_heldout, names)) / len(names)
    assert 0.025 < frac < 0.035
    assert is_heldout("pkg/mod_7.py") == is_heldout("pkg/mod_7.py")


def test_bpe_special_ids_and_serving_tokenizer(tmp_path):
    texts = ["def parse_args(argv):\n    return argv\n" * 20, "class A:\n    pass\n" * 20]
    tok = T.train_bpe(texts, vocab_size=300)
    assert [tok.token_to_id(s) for s in T.SPECIAL_TOKENS] == [0, 1, 2, 3]
    T.save(tok, tmp_path)
    served = Tokenizer.from_dir(tmp_path)
    assert (served.pad_token_id, served.bos_token_id, served.eos_token_id) == (0, 1, 2)
    assert served.token_to_id("<mask>") == 3
    s = "def f(x):\n\treturn 'é😀'  # ok\n"
    assert served.decode(served.encode(s)) == s  # byte-level: exact round trip, unseen characters too
    assert T.encode_batch(tok, [s])[0] == served.encode(s)


def test_windows():
    stream = token_stream(lambda texts: [[5] * len(t) for t in texts], ["ab", "cde"], eos_id=2)
    assert stream.tolist() == [5, 5, 2, 5, 5, 5, 2]
    g = torch.Generator().manual_seed(0)
    w = random_windows(torch.arange(100), 4, 10, g)
    assert w.shape == (4, 10) and torch.equal(w[:, 1:] - w[:, :-1], torch.ones(4, 9, dtype=torch.long))
    batches = list(sequential_windows(torch.arange(100), 3, 10, max_windows=7))
    assert [b.shape[0] for b in batches] == [3, 3, 1] and batches[0][1, 0] == 10


def test_wsd_schedule_and_replan():
    oc = OptimConfig(lr=1.0, warmup_steps=10, decay_fraction=0.25, min_lr_ratio=0.1)
    lrs = [wsd_lr(s, 100, oc) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[74] == 1.0
    assert lrs[75] == 1.0 and lrs[76] < 1.0 and abs(lrs[99] - (1 - 0.9 * 24 / 25)) < 1e-9
    b = Budget(minutes=10, safety=1.0)
    assert b.replan(1000, 100, 60.0, 0.6, 0.25) == 1000  # 540 s left at 0.6 s/step: 900 more steps
    assert b.replan(1000, 100, 60.0, 1.2, 0.25) == 550  # slower machine: shorter schedule
    assert b.replan(1000, 800, 60.0, 5.0, 0.25) == 1000  # already decaying: kept


def test_init_for_training_and_router_balancer():
    cfg = preset("tiny")
    ctx = init_for_training_(ContextTower(cfg), seed=0)
    assert torch.equal(ctx.model.norm_f.weight, torch.ones_like(ctx.model.norm_f.weight))
    bal = RouterBalancer(ctx, rate=0.1)
    router = ctx.model.layers[cfg.pattern.index("E")].mixer.gate
    ids = torch.randint(4, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    ctx(ids, ctx.new_state(2, 8))  # grad enabled: counted
    counts = bal.counts[router].clone()
    assert counts.sum() == 2 * 8 * cfg.num_experts_per_tok
    bal.step()
    bias = router.e_score_correction_bias
    assert torch.equal(bias, 0.1 * torch.sign(counts.mean() - counts))
    assert bal.counts[router].sum() == 0
    bal.remove()
