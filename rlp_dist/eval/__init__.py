"""Evaluation: think vs no-think on held-out text (``rlp-dist eval``, in-loop ``eval.every``) and
``rlp-dist compare`` of several runs against cumulative FLOPs."""
