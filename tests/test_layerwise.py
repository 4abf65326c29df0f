import torch

from minicpm_compress.layerwise import gram_matrix


def test_gram_matrix_of_wide_inputs_is_xtx_and_exactly_symmetric():
    torch.manual_seed(0)
    x = torch.randn(300, 700) * torch.rand(700)
    gram = gram_matrix(x, block=128)  # 700 columns: blocks of 128, the last one narrower
    assert torch.allclose(gram, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(gram, gram.T)
    narrow = torch.randn(50, 200)
    assert torch.equal(gram_matrix(narrow, block=128), narrow.T @ narrow)  # at most two blocks: one product
