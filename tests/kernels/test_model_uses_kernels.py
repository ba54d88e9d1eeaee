"""The model's `kernels` field: the Triton path (interpreted on CPU) gives the same
loss and gradients as the torch path."""
import torch

from megamm.config import ModelConfig, VocabConfig
from megamm.model import build_model

VOCAB = VocabConfig(text_size=20, n_special=10, image_codes=8, image_tokens=2, audio_codebooks=2,
                    audio_codebook_size=4, pad_multiple=8)


def test_triton_and_torch_paths_agree():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab=VOCAB)
    results = []
    for kernels in ("torch", "triton"):
        m = build_model(cfg.replace(kernels=kernels), seed=0)
        v = m.vocab
        doc = v.document([v.text_segment([1, 2, 3]), v.image_segment([1, 7])])
        ids = torch.tensor([doc + doc])
        out = m(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
