"""Fused ops of IPMT's hot paths, each with interchangeable backends (see ``registry``)."""
from .blocks import (deformable_self_attention_block, feed_forward_block, prediction_head, prototype_attention_block,
                     query_update_block)
from .deform_attention import deformable_self_attention, deformable_self_attention_reference
from .deform_sample import ms_deform_sample, ms_deform_sample_reference
from .ffn import feed_forward, feed_forward_reference
from .prototype_attention import masked_prototype_attention, masked_prototype_attention_reference
from .query_activation import (prototype_mask_logits, prototype_mask_logits_reference, prototype_query_update,
                               prototype_query_update_reference)
from .registry import BACKENDS, registered_backends, selected_backend

__all__ = [
    "BACKENDS", "deformable_self_attention", "deformable_self_attention_block", "feed_forward_block",
    "prediction_head", "prototype_attention_block", "query_update_block", "deformable_self_attention_reference", "feed_forward",
    "feed_forward_reference", "masked_prototype_attention", "masked_prototype_attention_reference", "ms_deform_sample",
    "ms_deform_sample_reference", "prototype_mask_logits", "prototype_mask_logits_reference", "prototype_query_update",
    "prototype_query_update_reference", "registered_backends", "selected_backend",
]
