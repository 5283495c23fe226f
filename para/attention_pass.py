"""A graph pass for a compiled CPU decoding step: para::decode_attention (para/kernels) in place
of torch's attention. Apart from para/fast.py, which imports it only when it compiles: importing
inductor takes a second, which every process would pay."""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from para import kernels


class DecodingAttention(CustomGraphPass):
    """A graph pass for a compiled CPU decoding step (inductor's post_grad_custom_post_pass):
    torch's float32 attention of one query a row becomes para::decode_attention
    (para/kernels/attention.cpp), the same arithmetic without the flash kernel's set-up for
    blocks of queries (32-44 against 56-78 us a layer on SmolLM2, docs/design.md)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.target is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
                continue
            q, k, v, *rest = node.args
            query = q.meta["val"]
            if query.shape[2] != 1 or query.dtype != torch.float32 or any(rest) \
                    or any(user.args[1] != 0 for user in node.users):   # dropout, causal, or the log-sum-exp read
                continue
            scale = node.kwargs.get("scale") or query.shape[-1] ** -0.5
            with graph.inserting_before(node):
                attended = graph.call_function(torch.ops.para.decode_attention.default,
                                               (q, k, v, node.kwargs.get("attn_mask"), scale))
            attended.meta["val"] = torch.empty_like(query, memory_format=torch.contiguous_format)
            for user in list(node.users):   # the output, getitem(node, 0)
                user.replace_all_uses_with(attended)
                graph.erase_node(user)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        """Inductor keeps compiled graphs on disk under it. The kernels' sources are in it too: a
        graph compiled against an older para::linear would call it with the older arguments
        (inductor's own key does not see an operator's schema)."""
        return get_hash_for_files((__file__, *kernels.SOURCES))
