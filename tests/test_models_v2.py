"""Contract v2 training blocks: LevelQuantizer, ResidualBinaryBlock, ResidualBinaryNet.

The eval-mode float blocks and their exported golden layers / graphs agree bit for bit."""

import pytest
import torch

from bitdet.core.fold import (
    fold_levels,
    residual_output,
    residual_preactivation,
    uniform_quantize,
)
from bitdet.core.golden import run_graph, run_layer
from bitdet.sw.models import (
    MIN_STEP,
    BinaryBlock,
    LevelQuantizer,
    ResidualBinaryBlock,
    ResidualBinaryNet,
    binarize,
)


def _grid(bits: int, gen: torch.Generator) -> LevelQuantizer:
    if bits == 1:
        return LevelQuantizer(1)
    step = float(torch.rand((), generator=gen)) * 0.6 + 0.05
    zero = float(torch.randn((), generator=gen)) * 0.5
    return LevelQuantizer(bits, step=step, zero=zero, learn=False)


def _randomize(block: ResidualBinaryBlock, gen: torch.Generator) -> None:
    """Random BN statistics (γ < 0 and γ = 0 channels), biases, gains and steps."""
    o = block.out_channels
    with torch.no_grad():
        bn = block.bn
        bn.running_mean.copy_(torch.randn(o, generator=gen) * 3)
        bn.running_var.copy_(torch.rand(o, generator=gen) * 20 + 0.1)
        bn.weight.copy_(torch.randn(o, generator=gen))
        bn.weight[::5] = 0.0
        bn.bias.copy_(torch.randn(o, generator=gen) * 0.5)
        block.sign_bias.copy_(torch.randn(o, generator=gen) * 0.3)
        block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=gen))
        if block.shortcut_gain is not None:
            block.shortcut_gain.copy_(torch.randn(o, generator=gen))
        for quant in (block.quant, block.residual_quant):
            if quant is not None and quant.bits > 1:
                quant.step.fill_(float(torch.rand((), generator=gen)) * 0.8 + 0.1)
                quant.zero.fill_(float(torch.randn((), generator=gen)) * 0.3)


def _randomize_net(net: ResidualBinaryNet, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for block in net.blocks:
        _randomize(block, gen)


# -- LevelQuantizer ------------------------------------------------------------------------

def test_one_bit_level_quantizer_is_the_sign_activation():
    q = LevelQuantizer(1)
    assert float(q.scale()) == 2.0 and float(q.zero_point()) == -1.0
    assert not list(q.parameters())
    pre = torch.tensor([-1.5, -0.3, 0.0, 0.2, 3.0], requires_grad=True)
    pre2 = pre.detach().clone().requires_grad_(True)
    out = q(pre)
    assert torch.equal(out, binarize(pre2))
    assert torch.equal(q.levels(pre.detach()), torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32))
    assert torch.equal(q.dequantize(q.levels(pre.detach())), out.detach())
    out.sum().backward()
    binarize(pre2).sum().backward()
    assert torch.equal(pre.grad, pre2.grad)
    with pytest.raises(ValueError, match="sign"):
        LevelQuantizer(1, step=0.5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_level_quantizer_levels_values_and_lsq_gradient(bits):
    q = LevelQuantizer(bits, step=0.3, zero=-0.2)
    top = (1 << bits) - 1
    pre = torch.linspace(-1, 0.3 * top + 1, 41)
    levels = q.levels(pre)
    assert torch.equal(levels, uniform_quantize(pre, q.scale(), bits))
    q.eval()
    assert torch.equal(q(pre), levels.float() * q.scale().detach() + q.zero.detach())
    assert torch.equal(q.recover(q(pre)), levels)
    q.train()
    x = pre.clone().requires_grad_(True)
    out = q(x)
    assert torch.allclose(out.detach(), q.dequantize(levels), atol=1e-6)
    out.sum().backward()
    inside = (pre / 0.3 > 0) & (pre / 0.3 < top)
    assert torch.equal(x.grad, inside.float())                       # straight-through
    v = pre / 0.3
    expected = torch.where(v <= 0, 0.0, torch.where(v >= top, float(top), torch.round(v) - v))
    g = 1.0 / (pre.numel() * top) ** 0.5
    assert torch.allclose(q.step.grad, expected.sum() * g, atol=1e-5)   # LSQ
    assert float(q.zero.grad) == pre.numel()


def test_level_quantizer_step_stays_positive_and_refuses_off_grid_values():
    q = LevelQuantizer(2, step=0.5)
    with torch.no_grad():
        q.step.fill_(-0.25)
    assert float(q.scale().detach()) == 0.25
    q.step.data.fill_(0.0)
    assert float(q.scale().detach()) == pytest.approx(MIN_STEP)
    q.step.data.fill_(0.5)
    with pytest.raises(ValueError, match="not on the grid"):
        q.recover(torch.tensor([0.3]))
    with pytest.raises(ValueError, match="1 to 4 bits"):
        LevelQuantizer(5)


# -- ResidualBinaryBlock: eval == exported layer ------------------------------------------

@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("out_bits", [1, 2, 3, 4])
def test_block_eval_equals_exported_layer_bit_for_bit(in_bits, out_bits):
    gen = torch.Generator().manual_seed(16 * in_bits + out_bits)
    flipped, seen = 0, set()
    for shortcut_bits in range(5):
        for stride in (1, 2):
            grid, sgrid = _grid(in_bits, gen), _grid(max(shortcut_bits, 1), gen)
            block = ResidualBinaryBlock(
                4, 8, in_bits=in_bits, out_bits=out_bits, shortcut_bits=shortcut_bits,
                stride=stride, pad_level=int(torch.randint(0, 1 << in_bits, (), generator=gen)),
                in_grid=grid, shortcut_grid=sgrid if shortcut_bits else None)
            _randomize(block, gen)
            block.eval()
            a = torch.randint(0, 1 << in_bits, (2, 4, 6, 6), generator=gen, dtype=torch.int32)
            r = (torch.randint(0, 1 << shortcut_bits, (2, 4, 6, 6), generator=gen,
                               dtype=torch.int32) if shortcut_bits else None)
            layer = block.to_device()
            assert (layer.in_bits, layer.shortcut_bits, layer.output_bits) == \
                (in_bits, shortcut_bits, out_bits)
            assert layer.padding_level == block.pad_level
            flipped += int((layer.weights != block._signs()).any(dim=(1, 2, 3)).sum())
            rr = None if r is None else block._shortcut_map(r)
            expected = run_layer(a, layer, rr)
            assert torch.equal(block.forward_levels(a, r), expected), (shortcut_bits, stride)
            if in_bits == 1:             # the v1 path: a ±1 float input
                assert torch.equal(run_layer(a.float() * 2 - 1, layer, rr), expected)
            with torch.no_grad():        # the float forward on the values a·s + z
                values = block(grid.dequantize(a), None if r is None else sgrid.dequantize(r))
            assert torch.equal(block.quant.recover(values), expected)
            seen |= set(expected.unique().tolist())
    assert flipped                       # γ < 0 channels flip weights
    assert seen == set(range(1 << out_bits))      # every output level occurs


def test_one_bit_block_without_shortcut_is_todays_binary_block():
    torch.manual_seed(3)
    old = BinaryBlock(4, 8)
    new = ResidualBinaryBlock(4, 8)
    gen = torch.Generator().manual_seed(3)
    _randomize(new, gen)
    old.load_state_dict({k: v for k, v in new.state_dict().items() if k in old.state_dict()})
    old.eval()
    new.eval()
    a, b = old.export(), new.to_device()
    assert torch.equal(a.weights, b.weights) and torch.equal(a.thresholds, b.thresholds)
    x = torch.randint(0, 2, (2, 4, 6, 6)).float() * 2 - 1
    with torch.no_grad():
        assert torch.equal(old(x), new(x))


def test_residual_output_makes_a_second_layer_from_the_same_preactivation():
    gen = torch.Generator().manual_seed(7)
    block = ResidualBinaryBlock(4, 8, in_bits=1, out_bits=1, shortcut_bits=3, stride=2,
                                residual_bits=3, shortcut_grid=_grid(3, gen))
    _randomize(block, gen)
    block.eval()
    a = torch.randint(0, 2, (2, 4, 8, 8), generator=gen, dtype=torch.int32)
    r = torch.randint(0, 8, (2, 4, 8, 8), generator=gen, dtype=torch.int32)
    out, res = block.forward_levels(a, r)
    rr = block._shortcut_map(r)
    assert torch.equal(out, run_layer(a, block.to_device(), rr))
    assert torch.equal(res, run_layer(a, block.to_device(residual=True), rr))
    assert block.to_device(residual=True).output_bits == 3
    with pytest.raises(ValueError, match="no residual"):
        ResidualBinaryBlock(4, 8).to_device(residual=True)


def test_non_additive_shortcut_is_refused_by_fold_naming_the_channel():
    """What export relies on: the shortcut only adds a constant per (channel, r). A gated
    shortcut (pre·(r − 1)) flips a channel's direction between shortcut levels."""
    gen = torch.Generator().manual_seed(1)
    block = ResidualBinaryBlock(4, 8, shortcut_bits=2, shortcut_grid=_grid(2, gen))
    _randomize(block, gen)
    block.eval()
    epilogue, signs = block.epilogue(), block._signs()
    from bitdet.core.fold import weight_sums
    s = weight_sums(signs)

    def gated(d, r):
        return residual_output(residual_preactivation(d, None, epilogue, s) * (r - 1),
                               epilogue, 1)

    with pytest.raises(ValueError, match=r"output channel \d+ rises .* shortcut level \d+ "
                                         r"but falls for shortcut level \d+"):
        fold_levels(gated, k=36, in_bits=1, weight_sums=s, out_bits=1, shortcut_bits=2)

    def additive(d, r):                  # the block's own epilogue folds for any r
        return residual_output(residual_preactivation(d, r, epilogue, s), epilogue, 1)

    fold_levels(additive, k=36, in_bits=1, weight_sums=s, out_bits=1, shortcut_bits=2)


def test_block_refuses_bad_configurations():
    with pytest.raises(ValueError, match="multiple of in_channels"):
        ResidualBinaryBlock(3, 8, shortcut_bits=1)
    with pytest.raises(ValueError, match="in_grid has 2 bits"):
        ResidualBinaryBlock(4, 8, in_bits=1, in_grid=LevelQuantizer(2))
    with pytest.raises(ValueError, match="shortcut_bits"):
        ResidualBinaryBlock(4, 8, shortcut_bits=5)
    block = ResidualBinaryBlock(4, 8, shortcut_bits=1)
    with pytest.raises(ValueError, match="none was given"):
        block(torch.ones(1, 4, 4, 4))


# -- training ------------------------------------------------------------------------------

def test_training_gradients_reach_weights_steps_and_biases_and_reduce_a_loss():
    torch.manual_seed(0)
    block = ResidualBinaryBlock(4, 8, in_bits=2, out_bits=2, shortcut_bits=2, stride=2,
                                residual_bits=3, in_grid=LevelQuantizer(2, learn=False),
                                shortcut_grid=LevelQuantizer(2, learn=False))
    a = torch.randint(0, 4, (4, 4, 8, 8))
    x = block.in_grid.dequantize(a)
    target = torch.rand(4, 8, 4, 4) * 2
    optimizer = torch.optim.SGD(block.parameters(), lr=0.05)
    block.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        out, res = block(x, x)
        loss = (out - target).pow(2).mean() + (res - target).pow(2).mean()
        loss.backward()
        losses.append(float(loss.detach()))
        if len(losses) == 1:
            for name in ("conv.weight", "quant.step", "quant.zero", "residual_quant.step",
                         "sign_bias", "shortcut_gain", "bn.weight", "bn.bias"):
                grad = dict(block.named_parameters())[name].grad
                assert grad is not None and bool(grad.abs().sum() > 0), name
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0]
    block.eval()                         # still exact after training
    r = a.to(torch.int32)
    out, res = block.forward_levels(r, r)
    assert torch.equal(out, run_layer(r, block.to_device(), block._shortcut_map(r)))


# -- the network helper --------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"act_bits": 1, "residual_bits": 3},         # W1A1, 3-bit residual stream
    {"act_bits": 1, "residual_bits": 0},         # W1A1, 1-bit shortcuts
    {"act_bits": 2, "residual_bits": 0},         # W1A2
    {"act_bits": 2, "residual_bits": 4, "input_bits": 1},
])
def test_network_graph_equals_float_network(options):
    torch.manual_seed(5)
    net = ResidualBinaryNet(4, widths=(8, 16, 16), strides=(1, 2, 1), **options)
    x_levels = torch.randint(0, 1 << net.input_grid.bits, (4, 4, 8, 8))
    net.train()                          # a couple of steps so BN and steps move
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(2):
        optimizer.zero_grad()
        net(net.input_grid.dequantize(x_levels)).pow(2).mean().backward()
        optimizer.step()
    _randomize_net(net, 11)
    net.eval()
    a = torch.randint(0, 1 << net.input_grid.bits, (3, 4, 8, 8), dtype=torch.int32)
    nodes = net.to_graph()
    graph = run_graph(a, nodes, input_bits=net.input_grid.bits)
    levels = net.forward_levels(a)
    with torch.no_grad():
        values = net.intermediates(net.input_grid.dequantize(a))
    assert set(levels) == set(values) and set(levels) <= set(graph)
    assert any(node.name.endswith(".pool") for node in nodes)
    assert any(node.name.endswith(".repeat") for node in nodes)
    for name, got in levels.items():
        i = int(name[1:].split(".")[0])
        quant = net.blocks[i].residual_quant if name.endswith(".res") else net.blocks[i].quant
        assert torch.equal(graph[name], got), name
        assert torch.equal(quant.recover(values[name]), got), name
        assert 0 < int(got.max())
