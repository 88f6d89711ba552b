import pytest
import torch
from cn_clip.clip import tokenize as upstream_tokenize

from cn_clip_patch.device import on_device
from cn_clip_patch.prompt import PromptError, check_prompt, tokenize

PROMPT = "这是一张图片，里面存在商品："


def test_tokens_equal_upstream_after_prompt_and_cut_to_longest():
    texts = ["红色的三角形", "浅蓝色背景上有两个红色的三角形", "“Nike”运动鞋"]
    ours = tokenize(texts, 52, PROMPT)
    ref = upstream_tokenize([(PROMPT + t).lower().replace("“", '"').replace("”", '"') for t in texts], 52)
    assert ours.shape[1] < 52
    assert torch.equal(ours, ref[:, : ours.shape[1]]) and not ref[:, ours.shape[1] :].any()


def test_cut_padding_gives_the_same_text_features(tiny_model):
    texts = ["红色", "浅蓝色背景上有两个红色的三角形"]
    tiny_model.eval()
    with torch.no_grad():
        cut = tiny_model.encode_text(tokenize(texts, 32))
        padded = tiny_model.encode_text(tokenize(texts, 32, trim=False))
    assert torch.allclose(cut, padded, atol=1e-5)


def test_prompt_longer_than_context_is_refused():
    check_prompt(PROMPT, 52)
    with pytest.raises(PromptError, match="leaves no room"):
        check_prompt(PROMPT, 12)


def test_on_device_redirects_upstream_cuda_calls():
    with on_device("cpu"):
        t = torch.ones(2).cuda(0, non_blocking=True)
        m = torch.nn.Linear(2, 2).cuda(0)
    assert t.device.type == "cpu" and next(m.parameters()).device.type == "cpu"
    assert torch.Tensor.cuda.__name__ == "cuda"  # restored
