"""
The toy study: runs of train.py, sample.py and evaluate.py on the toy world (plumbing/images.py),
scored by the toy scorer (plumbing/toy_scorer.py), that show what the objectives do on data whose
truth is known (docs/toy-study.md).

    bash toy/demo.sh            # the main job: SFT, DPO and RPO from the shipped toy base, one table
    python -m toy.experiment    # runs variants on an lr grid (toy/experiment.py)
    python -m toy.frontier      # the style-content frontier
    python -m toy.factorial     # the factorial: weighting × t sampling
    python -m toy.lr_gap        # what differs between the objectives at one learning rate
    python -m toy.clip          # toy-clip, the CLIP behind E5 on toy data: trained and measured
"""
