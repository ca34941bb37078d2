"""Shared atoms of the autoregressive (AR) and masked image-token papers.

`tokens`: log-probs of image tokens with the off-by-one handled, CFG logit mixing, token masks,
token-level advantages, the clipped token surrogate, per-token KL estimators, masked-token
log-prob estimates and the sequence DPO loss. The toy tokenizer is `common.toy.vq`.
"""
