"""Evaluation: metrics under explicit published conventions, LLM judge, agreement, reports.

Modules: masks (Dice/IoU/gIoU/cIoU), boxes (IoU, acc@0.5, BiRD recall), vqa (answer scoring),
text (BLEU/ROUGE-L/METEOR/CIDEr), semantic (MiniLM similarity, optional extra), judge (LLM
judge), agreement (correlations and kappa), stats (bootstrap), predictions (resumable store),
plots (figures), report (`run_report`: metrics.json, predictions.jsonl, report.md, PNGs).
Import from the submodules: this package imports nothing heavy (matplotlib, nltk) by itself.
"""
