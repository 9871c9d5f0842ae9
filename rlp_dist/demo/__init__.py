"""A first run that shows RLP learning: a synthetic corpus where a short thought carries the
information the next token needs (:mod:`rlp_dist.demo.data`) and the recipe ``scripts/demo.sh``."""
