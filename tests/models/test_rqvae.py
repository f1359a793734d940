import torch

from fedmm_secure.models.rqvae import RQVAE


def test_reconstruction_improves_with_training():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g) @ torch.randn(12, 12, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vq = RQVAE(in_dim=12, latent_dim=6, hidden=32, n_global=16, n_local=8, generator=g)
    before = vq.reconstruction_error(x)
    opt = torch.optim.Adam(list(vq.encoder.parameters()) + list(vq.decoder.parameters()), lr=5e-3)
    for _ in range(120):
        opt.zero_grad()
        loss, _ = vq(x, beta=0.25)
        loss.backward()
        opt.step()
    after = vq.reconstruction_error(x)
    assert after < 0.7 * before


def test_latents_are_bounded_and_codes_in_range():
    g = torch.Generator().manual_seed(1)
    vq = RQVAE(in_dim=5, latent_dim=3, hidden=8, n_global=4, n_local=2, generator=g)
    x = 100 * torch.randn(50, 5, generator=g)
    c1, c2, z, r1 = vq.codes(x)
    assert abs(z).max() <= 1.0  # tanh: the bound that sizes the secure-aggregation ring
    assert c1.min() >= 0 and c1.max() < 4 and c2.min() >= 0 and c2.max() < 2
