"""Training the bundled two-tower model on CPU (and the micro model of the synthetic CI test).

    corpus.py     CPython standard library source: fixed file list, corpus hash, held-out files, windows
    tokenizer.py  byte-level BPE with the fixed special ids <pad>=0 <s>=1 </s>=2 <mask>=3
    ar.py         autoregressive pre-training of the context tower (next-token CE)
    denoiser.py   the denoiser trained against the frozen context tower, all blocks in one pass
    common.py     optimiser, LR schedule, resumable checkpoints, progress bars
    synthetic.py  exact-answer tasks (copy / reverse of digit strings) and a char tokenizer
    run.py        `python -m twotower.towers.train.run`: tokenizer -> AR -> denoiser -> checkpoint

Nothing here imports `twotower.cluster`.
"""
