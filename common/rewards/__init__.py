"""Rewards with one signature: `reward(images, prompts, metadata) -> (scores, info)` (see base.py).

`load_reward(name, **kwargs)` builds one by name; each branch imports its module only when asked, so
`import common.rewards` does not import transformers. The table of rewards, what they measure and how to
load real weights is in docs/common/rewards.md.
"""

from __future__ import annotations

from typing import Any

from common.rewards.base import Metadata, Reward, check_inputs, check_scores

REWARD_NAMES = (
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "aesthetic",
    "clip_score",
    "pickscore",
    "toy_geneval",
    "toy_soft",
    "http",
)


def load_reward(name: str, **kwargs: Any) -> Reward:
    """Build the reward called `name`; `kwargs` go to its constructor.

    jpeg_compressibility / jpeg_incompressibility: JpegCompressibility(quality=95) / JpegIncompressibility
    aesthetic: AestheticReward(clip_dir, head_path, tiny)
    clip_score: ClipScore(clip_dir, processor_dir, tiny, scale, clamp_at_zero)
    pickscore: PickScore(model_dir, processor_dir, tiny)
    toy_geneval / toy_soft: ToyGenEvalReward / ToySoftReward (common.rewards.toy)
    http: HttpReward(url, timeout, batch_size)
    """
    if name == "jpeg_compressibility":
        from common.rewards.jpeg import JpegCompressibility
        return JpegCompressibility(**kwargs)
    if name == "jpeg_incompressibility":
        from common.rewards.jpeg import JpegIncompressibility
        return JpegIncompressibility(**kwargs)
    if name == "aesthetic":
        from common.rewards.aesthetic import AestheticReward
        return AestheticReward(**kwargs)
    if name == "clip_score":
        from common.rewards.clip import ClipScore
        return ClipScore(**kwargs)
    if name == "pickscore":
        from common.rewards.clip import PickScore
        return PickScore(**kwargs)
    if name == "toy_geneval":
        from common.rewards.toy import ToyGenEvalReward
        return ToyGenEvalReward(**kwargs)
    if name == "toy_soft":
        from common.rewards.toy import ToySoftReward
        return ToySoftReward(**kwargs)
    if name == "http":
        from common.rewards.http import HttpReward
        return HttpReward(**kwargs)
    raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARD_NAMES)}")


__all__ = ["REWARD_NAMES", "Metadata", "Reward", "check_inputs", "check_scores", "load_reward"]
