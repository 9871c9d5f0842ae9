"""The tied embedding's sparse weight gradient (rlp_dist.models.head.TiedEmbedding).

At TP=1 and TP=2: the lookup emits a sparse (looked-up rows) gradient, the model's weight gradients equal
megatron's dense lookup (VocabParallelEmbedding with deterministic_mode: an index backward) exactly
enough, through megatron's logits and through the fused log-prob op; the output layer's gradient reaches
the weight after the lookup's sparse rows (the order that lets autograd add them in place: the route's
node runs after the lookup's backward); the weight's accumulated gradient is dense whether or not the
output layer contributed; an untied model keeps megatron's embedding."""

import pytest
from helpers.spawn import run_ranks


def _ranks(_):
    import torch

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.models.head import TiedEmbedding, head_of, hidden_output, token_logprobs

    out = {}
    for tp in (1, 2):
        init_distributed(tp, 1)
        res = {}
        for preset in ("tiny_transformer", "tiny_hybrid"):
            mcfg = compose([f"+model={preset}", "model.tie_embeddings=true"]).model
            torch.manual_seed(0)
            model = build_model(mcfg)
            emb = model.embedding.word_embeddings
            ids = torch.randint(0, mcfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
            pos = torch.arange(16)[None].expand(2, 16)

            def grads(dense):
                model.zero_grad(set_to_none=True)
                emb.deterministic_mode = dense  # megatron's own dense path, same weights
                model(ids, pos, None).float().logsumexp(-1).sum().backward()
                return {n: p.grad.clone() for n, p in model.named_parameters()}

            new, ref = grads(False), grads(True)

            def fused_grads(dense, order=None):
                model.zero_grad(set_to_none=True)
                emb.deterministic_mode = dense
                with hidden_output(model):
                    h = model(ids, pos, None)  # (B, S, H)
                if order is not None:  # run when each node executes in the backward
                    if emb._handle is not None:
                        emb._handle.register_hook(lambda g: order.append("route"))
                    h.grad_fn.register_prehook(lambda g: order.append("head"))
                logp = token_logprobs(model, h[:, :-1], ids[:, 1:], 0.7, tp_group=head_of(model).tp_group)
                logp.sum().backward()
                return {n: p.grad.clone() for n, p in model.named_parameters()}

            order = []

            def on_lookup(module, inputs, out):  # hook the lookup's own backward node (EmbeddingBackward)
                todo = [out.grad_fn]
                while todo:
                    fn = todo.pop()
                    if type(fn).__name__.startswith("EmbeddingBackward"):
                        fn.register_prehook(lambda g: order.append("lookup"))
                        return
                    todo += [f for f, _ in fn.next_functions if f is not None]
                raise AssertionError("no EmbeddingBackward node under the lookup's output")

            hooked = emb.register_forward_hook(on_lookup)
            f_new = fused_grads(False, order)
            hooked.remove()
            f_ref = fused_grads(True)
            emb.deterministic_mode = False
            raw = torch.autograd.grad(emb(ids).sum(), emb.weight)[0]  # what the lookup alone emits
            model.zero_grad(set_to_none=True)
            model.embedding(ids, pos).float().pow(2).sum().backward()  # a backward without the output layer
            lone = emb.weight.grad
            in_shard = (ids.flatten() >= emb.vocab_start_index) & (ids.flatten() < emb.vocab_end_index)
            res[preset] = dict(
                cls=type(emb).__name__, raw_sparse=raw.is_sparse, new_layout=str(new[
                    "embedding.word_embeddings.weight"].layout), lone_layout=str(lone.layout),
                worst=max((new[k] - ref[k]).abs().max().item() for k in ref),
                fused_worst=max((f_new[k] - f_ref[k]).abs().max().item() for k in f_ref),
                fused_scale=max(v.abs().max().item() for v in f_ref.values()), order=order,
                scale=max(v.abs().max().item() for v in ref.values()),
                rows_in_shard=int(ids.flatten()[in_shard].unique().numel()), lone_rows=int((lone.abs().sum(-1) > 0).sum()))
        # a device/dtype without sparse gradients (the probe says no): megatron's dense lookup, same grads
        from rlp_dist.models import head as head_mod

        mcfg = compose(["+model=tiny_transformer"]).model
        torch.manual_seed(0)
        model = build_model(mcfg)
        emb = model.embedding.word_embeddings
        key = (emb.weight.device.type, emb.weight.dtype)
        assert head_mod.sparse_rows_supported(emb.weight.device, emb.weight.dtype)  # CPU fp32 runs it
        head_mod._SPARSE_OK[key] = False
        try:
            few = torch.randint(0, mcfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
            raw = torch.autograd.grad(emb(few).sum(), emb.weight)[0]
            res["fallback_dense"] = not raw.is_sparse and emb._handle is None
        finally:
            head_mod._SPARSE_OK[key] = True
        untied = build_model(compose(["+model=tiny_transformer", "model.tie_embeddings=false"]).model)
        res["untied_cls"] = type(untied.embedding.word_embeddings).__name__
        res["tied_cls_is_subclass"] = issubclass(TiedEmbedding, type(untied.embedding.word_embeddings))
        out[tp] = res
    return out


@pytest.mark.distributed
def test_tied_embedding_sparse_gradient_equals_megatrons_dense_lookup():
    for rank, per_tp in enumerate(run_ranks(_ranks, 2, (None,))):
        for tp, res in per_tp.items():
            assert res["untied_cls"] == "VocabParallelEmbedding" and res["tied_cls_is_subclass"]
            assert res["fallback_dense"], f"rank {rank} tp={tp}: no dense fallback when sparse is unsupported"
            for preset in ("tiny_transformer", "tiny_hybrid"):
                r = res[preset]
                where = f"rank {rank} tp={tp} {preset}"
                assert r["cls"] == "TiedEmbedding", where
                assert r["raw_sparse"], f"{where}: the lookup's weight gradient is not sparse"
                assert r["new_layout"] == r["lone_layout"] == "torch.strided", f"{where}: {r}"
                assert r["scale"] > 0 and r["worst"] <= 1e-6 * r["scale"], f"{where}: {r}"
                assert r["fused_scale"] > 0 and r["fused_worst"] <= 1e-6 * r["fused_scale"], f"{where}: {r}"
                # the lookup's backward node runs, then the route's node, last
                assert r["order"][0] == "head" and r["order"][-2:] == ["lookup", "route"], f"{where}: {r['order']}"
                assert 0 < r["lone_rows"] <= r["rows_in_shard"], f"{where}: {r}"
