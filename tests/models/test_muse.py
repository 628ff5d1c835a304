"""Muse / MaskGIT with tiny components (hidden 32, depth 2, codebook 16): forward,
backward, generation, guidance, schedules, seeds, kernel paths, bad input."""

import os
import warnings

import numpy as np
import pytest
import torch

from t2i import generate
from t2i.data import ByteTokenizer
from t2i.data.scenes import COLOUR_NAMES, COLOURS, parse_caption
from t2i.generate import (
    LAYOUT_SHARPEN,
    LAYOUT_THRESHOLD,
    PAINTER_DECODING,
    PLAIN_DECODING,
    LayoutDrawer,
    MuseGenerator,
    masked_counts,
)
from t2i.models.muse import (
    COLOUR_CLASSES,
    LocalMix,
    LowRes,
    MaskGitTransformer,
    MuseConfig,
    MuseTask,
    class_mix,
    colour_map,
    layout_picture,
    mask_ratio,
    object_coverage,
    permute_layout_colours,
    pick_layout,
    random_mask,
    shape_word_nll,
)
from t2i.models.vqgan import VQGAN, VQGANConfig
from t2i.modules import grid_positions

TOKENIZER = ByteTokenizer(48)


def _model(**kw) -> MaskGitTransformer:
    torch.manual_seed(0)
    config = MuseConfig(**{**dict(num_codes=16, grid=4, dim=32, depth=2, heads=4,
                                  text_vocab=TOKENIZER.vocab_size, text_length=48, text_dim=32,
                                  text_depth=1), **kw})
    return MaskGitTransformer(config).eval()


@pytest.fixture(scope="module")
def vqgan():
    torch.manual_seed(0)
    return VQGAN(VQGANConfig(channels=8, mults=(1, 2, 2), num_codes=16, code_dim=8)).eval()


def test_forward_and_backward_touch_every_parameter():
    model = _model(self_condition=True, local_kernel=3).train()
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    tokens = torch.randint(0, 16, (2, 16))
    masked = random_mask(2, 16, "cosine", "cpu")
    loss, accuracy = model(tokens, masked, {"text": ids, "text_mask": mask,
                                            "drop": torch.tensor([True, False])},
                           torch.tensor([True, True]), mode="loss")
    loss.backward()
    assert torch.isfinite(loss) and 0 <= accuracy <= 1
    untouched = [n for n, p in model.named_parameters() if p.grad is None]
    assert untouched == []
    logits, hidden = model(tokens, *model.condition(text=ids, text_mask=mask))
    assert logits.shape == (2, 16, 16) and hidden.shape == (2, 16, 32)


def test_a_rotary_text_encoder_reads_word_order_without_a_position_table():
    learned, rotary = _model(), _model(text_rotary=True)
    assert learned.text.pos is not None  # runs exported before text_rotary load as before
    assert rotary.text.pos is None
    ids, mask = TOKENIZER(["a red circle above a blue ring"])
    n = int(mask.sum())
    order = torch.arange(ids.shape[1])
    order[[3, 14]] = order[[14, 3]]  # swap two letters ("r" of red, "b" of blue)
    with torch.no_grad():
        states, _ = rotary.text(ids, mask)
        swapped, _ = rotary.text(ids[:, order], mask)
    # with no word order at all, swapping two inputs would only swap their two states
    moved = (swapped[0, order[:n]] - states[0]).abs().amax(-1)
    assert bool((moved > 1e-3).all())


def test_image_positions_start_from_the_grid_of_transformer_positions():
    model = _model(patch=2)  # 4 x 4 tokens -> 2 x 2 positions
    assert torch.equal(model.pos.embedding.detach(), grid_positions(2, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        MaskGitTransformer(MuseConfig(num_codes=16, grid=4, dim=30, heads=3))


def test_local_mixing_starts_as_identity_and_reaches_only_its_neighbours():
    model = _model(local_kernel=3, patch=2)  # 4 x 4 tokens -> 2 x 2 positions
    x = torch.randn(1, 4, 32)
    assert torch.equal(model.local[0](x), torch.zeros_like(x))  # zero-initialised: identity
    torch.manual_seed(0)
    mix = LocalMix(32, 3, 5)  # a 5 x 5 grid
    torch.nn.init.normal_(mix.proj.weight)
    x = torch.randn(1, 25, 32)
    y = x.clone()
    y[0, 0] += 1.0  # change the top-left position
    changed = (mix(x) - mix(y)).abs().amax(-1)[0].view(5, 5) > 0
    near = torch.zeros(5, 5, dtype=torch.bool)
    near[:2, :2] = True  # a 3 x 3 kernel reaches one position each way
    assert torch.equal(changed, near)
    with pytest.raises(ValueError, match="odd"):
        _model(local_kernel=2)


def test_object_coverage_is_the_object_fraction_of_each_token():
    seg = torch.zeros(2, 8, 8, dtype=torch.long)
    seg[0, 5, 2] = 3  # one pixel: in the 4 x 4 token grid (2 px a token) that is token (2, 1)
    seg[1, 0:2, 6:8] = 1  # exactly token (0, 3)
    want = torch.zeros(2, 4, 4)
    want[0, 2, 1], want[1, 0, 3] = 0.25, 1.0
    assert torch.equal(object_coverage(seg, 4), want.flatten(1))
    seg[1] = -1  # an image without a segmentation map
    with pytest.raises(ValueError, match="segmentation"):
        object_coverage(seg, 4)
    with pytest.raises(ValueError, match="segmentation"):
        object_coverage(None, 4)


def test_coverage_head_adds_its_weighted_loss_on_the_masked_tokens():
    model = _model(coverage_weight=0.5).train()
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    masked = torch.rand(2, 16, generator=g) < 0.6
    coverage = torch.rand(2, 16, generator=g)
    ctx = model.condition(text=ids, text_mask=mask)
    loss, _ = model.loss(tokens, masked, *ctx, coverage=coverage)
    plain, _ = model.loss(tokens, masked, *ctx)  # no coverage given: the token loss alone
    _, hidden = model.transformer(torch.where(masked, model.mask_id, tokens), *ctx)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        model.coverage(hidden[masked])[:, 0], coverage[masked])
    torch.testing.assert_close(loss, plain + 0.5 * bce, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert model.coverage.weight.grad.abs().sum() > 0


def test_class_mix_is_each_tokens_share_of_every_class():
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, 0, 0], seg[0, 0:2, 2:4] = 2, 1  # token (0, 0): a quarter class 2; (0, 1): all 1
    mix = class_mix(seg, 2, 3)
    assert mix.shape == (1, 4, 3)
    assert torch.equal(mix[0, 0], torch.tensor([0.75, 0.0, 0.25]))
    assert torch.equal(mix[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(mix[0, 2:], torch.tensor([[1.0, 0.0, 0.0]] * 2))
    with pytest.raises(ValueError, match="layout_classes"):
        class_mix(seg, 2, 2)  # class 2 does not fit two classes
    with pytest.raises(ValueError, match="do not split"):
        class_mix(seg, 3, 3)  # 4 px maps into 3 x 3 cells


def _cells_by_hand(per_token: torch.Tensor, d: int) -> torch.Tensor:
    """[B, 16, d*d*C] (4 x 4 tokens) -> [B, 4d, 4d, C]: token (y, x)'s cell (i, j) at
    (y*d + i, x*d + j), the slow way."""
    b, c = per_token.shape[0], per_token.shape[-1] // (d * d)
    out = torch.zeros(b, 4 * d, 4 * d, c)
    for y in range(4):
        for x in range(4):
            for i in range(d):
                for j in range(d):
                    k = i * d + j
                    out[:, y * d + i, x * d + j] = per_token[:, y * 4 + x, k * c:(k + 1) * c]
    return out


@pytest.mark.parametrize("detail", [1, 2])
def test_a_layout_model_learns_each_cells_class_mix_from_the_caption_alone(detail):
    model = _model(layout_model=True, layout_classes=3, layout_detail=detail).train()
    assert model.head.out_features == 3 * detail ** 2 and model.kind == "layout"
    texts = ["a red circle on the left", "a small blue ring at the top"]
    ids, mask = TOKENIZER(texts)
    side = 4 * detail
    target = torch.softmax(torch.randn(2, side, side, 3,
                                       generator=torch.Generator().manual_seed(5)), -1)
    loss, accuracy = model(target, {"text": ids, "text_mask": mask}, mode="layout")
    # by hand: every image token masked, the head's soft cross-entropy against the mixes
    ctx = model.condition(text=ids, text_mask=mask)
    logits, _ = model.transformer(torch.full((2, 16), model.mask_id), *ctx)
    logits = _cells_by_hand(logits, detail)
    soft = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, soft, rtol=1e-4, atol=1e-5)
    right = (logits.argmax(-1) == target.argmax(-1)).float().mean()
    torch.testing.assert_close(accuracy, right)
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.text.embed.weight.grad is not None
    drawn = LayoutDrawer(model, TOKENIZER, sharpen=0)(texts)  # objects where the background
    unlikely = torch.softmax(logits, -1)[..., 0] < LAYOUT_THRESHOLD  # is unlikely
    assert torch.equal(drawn, torch.where(unlikely, logits[..., 1:].argmax(-1) + 1, 0))
    for bad in ({"layout": "runs/x"}, {"critic": True}, {"low_res_codes": 16, "low_res_grid": 2},
                {"layout_detail": 0}):
        with pytest.raises(ValueError, match="layout"):
            _model(layout_model=True, **bad)
    with pytest.raises(ValueError, match="not a layout model"):
        _model().layout_logits(*ctx)


@pytest.mark.parametrize("detail", [1, 2])
def test_a_painter_paints_on_the_layout_it_is_given(detail):
    model = _model(layout="runs/layout", layout_classes=3, layout_detail=detail).train()
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    masked = torch.rand(2, 16, generator=g) < 0.6
    side = 4 * detail
    layout = torch.randint(0, 3, (2, side, side), generator=g)
    ctx = model.condition(text=ids, text_mask=mask)
    loss, _ = model.loss(tokens, masked, *ctx, layout=layout)
    # by hand: each token's cells' classes embedded (a table a cell position), summed, over
    # d, and added to its input, then the usual token loss
    x = model.token_embed(torch.where(masked, model.mask_id, tokens))
    table = model.layout_embed.weight
    added = torch.zeros_like(x)
    for y in range(4):
        for xx in range(4):
            for i in range(detail):
                for j in range(detail):
                    cls = layout[:, y * detail + i, xx * detail + j]
                    added[:, y * 4 + xx] += table[3 * (i * detail + j) + cls] / detail
    model.token_embed.forward = lambda _: x + added  # the layout added, by hand
    _, hidden = model.transformer(tokens, *ctx)
    del model.token_embed.forward
    ce = torch.nn.functional.cross_entropy(model.head(hidden[masked]), tokens[masked],
                                           label_smoothing=0.1)
    torch.testing.assert_close(loss, ce, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert model.layout_embed.weight.grad.abs().sum(1).gt(0).all()  # every class and cell
    other = layout.clone()
    other[:, 0, 0] = (other[:, 0, 0] + 1) % 3  # one cell changed
    changed, _ = model.loss(tokens, masked, *ctx, layout=other)
    assert not torch.isclose(changed, loss)
    with pytest.raises(ValueError, match="layout"):
        _model(layout="runs/layout", critic=True)
    with pytest.raises(ValueError, match="cells"):
        model.loss(tokens, masked, *ctx, layout=layout[:, :2])


def test_colour_map_reads_each_object_pixels_nearest_scene_colour():
    image = torch.full((1, 3, 2, 3), 0.0)  # grey: the background
    rgb = {(0, 0): (225, 45, 35), (0, 1): (40, 70, 225), (1, 2): (250, 125, 180)}
    for (y, x), c in rgb.items():  # near red, blue, pink
        image[0, :, y, x] = torch.tensor(c) / 127.5 - 1
    seg = torch.tensor([[[1, 2, 0], [0, 0, 3]]])
    image[0, :, 1, 0] = torch.tensor(COLOURS["green"]) / 127.5 - 1  # a colour, no object
    names = list(COLOURS)
    want = torch.tensor([[[1 + names.index("red"), 1 + names.index("blue"), 0],
                          [0, 0, 1 + names.index("pink")]]])
    assert torch.equal(colour_map(image, seg), want)


def test_true_layouts_with_colours_hold_each_cells_class_and_its_objects_colour():
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[0, :2, :2], seg[0, 3, 3] = 2, 1
    image = torch.zeros(1, 3, 4, 4)  # grey background
    image[:, :, :2, :2] = (torch.tensor(COLOURS["cyan"]) / 127.5 - 1)[None, :, None, None]
    image[:, :, 3, 3] = torch.tensor(COLOURS["orange"]) / 127.5 - 1
    config = MuseConfig(grid=2, layout_detail=2, layout_classes=3, layout_colour=True)
    mix, layout = MuseTask._layout(None, {"seg": seg, "image": image}, config)
    assert mix.shape == (1, 4, 4, 3 + COLOUR_CLASSES)
    names = list(COLOURS)
    want = torch.zeros(1, 4, 4, dtype=torch.long)
    want[0, :2, :2], want[0, 3, 3] = 2 + 3 * (1 + names.index("cyan")), \
        1 + 3 * (1 + names.index("orange"))
    assert torch.equal(layout, want)
    config.layout_detail = 1  # a cell a token: the majority class, its objects' colour
    mix, layout = MuseTask._layout(None, {"seg": seg, "image": image}, config)
    assert torch.equal(layout, torch.tensor([[[2 + 3 * (1 + names.index("cyan")), 0], [0, 0]]]))
    torch.testing.assert_close(mix[0, 1, 1, 3 + 1 + names.index("orange")], torch.tensor(0.25))


def test_centred_layouts_come_from_the_records_and_only_for_layout_models():
    from t2i.data import scenes

    renderer = scenes.Renderer(32)
    rng = np.random.default_rng(0)
    samples = [scenes.sample_scene(rng, renderer, held_out=False) for _ in range(3)]
    batch = {"image": torch.stack([torch.from_numpy(s[0]).permute(2, 0, 1) / 127.5 - 1
                                   for s in samples]),
             "seg": torch.stack([torch.from_numpy(s[1]).long() for s in samples]),
             "caption": [s[2] for s in samples], "record": [s[3] for s in samples]}
    config = MuseConfig(grid=16, layout_detail=2, layout_colour=True, layout_model=True,
                        layout_centred=True)
    mix, layout = MuseTask._layout(None, batch, config)
    seg, colour = zip(*(scenes.slot_layout(s[3], renderer) for s in samples), strict=True)
    k = config.layout_classes
    want = torch.from_numpy(np.stack(seg)).long()
    want = want + k * torch.from_numpy(np.stack(colour)).long()
    assert torch.equal(layout, want)
    true = MuseTask._layout(None, batch, MuseConfig(grid=16, layout_detail=2,
                                                    layout_colour=True))[1]
    assert not torch.equal(layout, true)  # the renderer's jitter moved some object
    config.layout_model = False  # a painter paints what the images show: the true layouts
    assert torch.equal(MuseTask._layout(None, batch, config)[1], true)
    config.layout_model = True
    with pytest.raises(ValueError, match="layout_centred"):
        MuseTask._layout(None, {**batch, "record": [None] * 3}, config)
    with pytest.raises(ValueError, match="layout_centred: only for a layout model"):
        _model(layout="runs/layout", layout_centred=True)


def test_a_layout_model_with_colours_learns_each_object_cells_colour_beside_the_classes():
    model = _model(layout_model=True, layout_classes=3, layout_colour=True).train()
    assert model.head.out_features == 3 + 8  # classes, then the eight scene colours
    texts = ["a red circle on the left", "a small blue ring at the top"]
    ids, mask = TOKENIZER(texts)
    g = torch.Generator().manual_seed(5)
    classes = torch.softmax(torch.randn(2, 4, 4, 3, generator=g), -1)
    # the colour mix: "none" as much as the background, the rest spread over the colours
    colours = torch.softmax(torch.randn(2, 4, 4, 8, generator=g), -1) * (1 - classes[..., :1])
    target = torch.cat([classes, classes[..., :1], colours], -1)  # as MuseTask._layout
    assert target.shape[-1] == 3 + COLOUR_CLASSES
    loss, accuracy = model(target, {"text": ids, "text_mask": mask}, mode="layout")
    logits = model.layout_logits(*model.condition(text=ids, text_mask=mask))
    assert logits.shape == (2, 4, 4, 11)
    shapes, hues = logits[..., :3], logits[..., 3:]
    # by hand: the classes' soft cross-entropy, plus the colours' weighted by object share
    soft = -(classes * torch.log_softmax(shapes, -1)).sum(-1).mean() \
        - 0.25 * (colours * torch.log_softmax(hues, -1)).sum(-1).mean()  # layout_colour_weight
    torch.testing.assert_close(loss, soft, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(accuracy, (shapes.argmax(-1) == classes.argmax(-1))
                               .float().mean())
    loss.backward()
    assert model.head.weight.grad[3:].abs().sum() > 0  # the colour scores learn too
    drawn = LayoutDrawer(model, TOKENIZER, sharpen=0)(texts)  # class + 3 x colour (none on
    # the background)
    unlikely = torch.softmax(shapes, -1)[..., 0] < LAYOUT_THRESHOLD
    shape = torch.where(unlikely, shapes[..., 1:].argmax(-1) + 1, 0)
    assert torch.equal(drawn, shape + 3 * torch.where(shape > 0, hues.argmax(-1) + 1, 0))
    assert bool((drawn < 3).any()) and bool((drawn >= 3).any())  # both kinds of cell here
    picture = layout_picture(drawn, 8, model.config)  # each cell in its colour, or black
    palette = torch.tensor([(0, 0, 0)] + list(COLOURS.values())) / 127.5 - 1
    torch.testing.assert_close(picture[:, :, ::2, ::2],
                               palette[drawn // 3].permute(0, 3, 1, 2))


def test_permuting_layout_colours_moves_the_caption_words_and_the_cells_alike():
    caption = "a big red circle on the left and a small blue ring at the top"
    classes = 3
    mix = torch.zeros(16, 2, 2, classes + COLOUR_CLASSES)
    mix[:, 0, 0, [1, classes + 1 + 0]] = 1  # a red circle cell
    mix[:, 0, 1, [2, classes + 1 + 5]] = 1  # a blue ring cell
    mix[:, 1, :, [0, classes]] = 1  # background: no colour
    mix[:, 1, 1, [0, 1, classes, classes + 1]] = 0.5  # half background, half red circle
    torch.manual_seed(0)
    texts, permuted = permute_layout_colours([caption] * 16, mix, classes)
    assert torch.equal(permuted[..., :classes + 1], mix[..., :classes + 1])  # classes, none
    firsts = set()
    for text, cells in zip(texts, permuted, strict=True):
        red, blue = (COLOUR_NAMES.index(o["colour"]) for o in parse_caption(text)["objects"])
        expect = torch.zeros(2, 2, COLOUR_CLASSES)
        expect[0, 0, 1 + red] = expect[0, 1, 1 + blue] = 1
        expect[1, :, 0] = 1
        expect[1, 1, [0, 1 + red]] = 0.5
        assert torch.equal(cells[..., classes:], expect)
        firsts.add(red)
    assert len(firsts) >= 4  # each sample its own permutation
    with pytest.raises(ValueError, match="layout_colour_permute"):
        _model(layout="runs/layout", layout_colour=True, layout_colour_permute=True)


def test_a_painter_with_colours_adds_each_cells_class_and_colour_embeddings():
    model = _model(layout="runs/layout", layout_classes=3, layout_colour=True,
                   layout_detail=2).train()
    width = 3 + COLOUR_CLASSES
    assert model.layout_embed.num_embeddings == 4 * width
    g = torch.Generator().manual_seed(6)
    layout = torch.randint(0, 3, (2, 8, 8), generator=g) + \
        3 * torch.randint(0, COLOUR_CLASSES, (2, 8, 8), generator=g)
    table = model.layout_embed.weight
    want = torch.zeros(2, 16, 32)
    for y in range(8):
        for x in range(8):
            cell = (y % 2) * 2 + x % 2
            cls, colour = layout[:, y, x] % 3, layout[:, y, x] // 3
            want[:, (y // 2) * 4 + x // 2] += (table[cell * width + cls] +
                                               table[cell * width + 3 + colour]) / 2
    features = model._embed_layout(layout, model.layout_embed)
    torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
    recoloured = layout.clone()
    recoloured[:, 0, 0] = recoloured[:, 0, 0] % 3 + 3 * ((recoloured[:, 0, 0] // 3 + 1) %
                                                       COLOUR_CLASSES)
    recoloured = model._embed_layout(recoloured, model.layout_embed)
    assert not torch.allclose(recoloured[:, 0], want[:, 0])


def test_layout_skip_adds_each_tokens_own_cells_to_its_output_features():
    model = _model(layout="runs/layout", layout_classes=3, layout_colour=True, layout_detail=2,
                   layout_skip=True).train()
    width = 3 + COLOUR_CLASSES
    assert model.layout_out.num_embeddings == 4 * width
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    layout = torch.randint(0, 3, (2, 8, 8), generator=g) + \
        3 * torch.randint(0, COLOUR_CLASSES, (2, 8, 8), generator=g)
    # by hand: each token's 2 x 2 cells' classes and colours through the skip's own tables
    # (a table a cell position), summed, over 2
    table, want = model.layout_out.weight, torch.zeros(2, 16, 32)
    for y in range(8):
        for x in range(8):
            row = ((y % 2) * 2 + x % 2) * width
            cell = layout[:, y, x]
            want[:, (y // 2) * 4 + x // 2] += (table[row + cell % 3] +
                                               table[row + 3 + cell // 3]) / 2
    skip = model._embed_layout(layout, model.layout_out)
    torch.testing.assert_close(skip, want, rtol=1e-5, atol=1e-5)
    ctx = model.condition(text=ids, text_mask=mask)
    _, hidden = model.transformer(tokens, *ctx, layout=layout)
    with torch.no_grad():  # the same pass without the skip path
        saved = model.layout_out.weight.clone()
        model.layout_out.weight.zero_()
        _, without = model.transformer(tokens, *ctx, layout=layout)
        model.layout_out.weight.copy_(saved)
    torch.testing.assert_close(hidden, without + skip, rtol=1e-5, atol=1e-5)
    loss, _ = model.loss(tokens, torch.ones_like(tokens, dtype=torch.bool), *ctx,
                         layout=layout)
    loss.backward()
    assert model.layout_out.weight.grad.abs().sum(1).gt(0).sum() > width  # many rows learn
    assert not hasattr(_model(layout="runs/layout"), "layout_out")
    assert not hasattr(_model(layout_skip=True), "layout_out")  # not a painter: ignored


def test_layout_reach_adds_the_cells_around_each_token_to_its_output_features():
    model = _model(layout="runs/layout", layout_classes=3, layout_colour=True, layout_detail=1,
                   layout_skip=True, layout_reach=1).train()
    width = 3 + COLOUR_CLASSES
    assert model.layout_out.num_embeddings == 9 * width  # a 3 x 3 window of tables
    g = torch.Generator().manual_seed(3)
    layout = torch.randint(0, 3, (2, 4, 4), generator=g) + \
        3 * torch.randint(0, COLOUR_CLASSES, (2, 4, 4), generator=g)
    # by hand: each token's 3 x 3 cells (past the edge: background, no colour, cell 0)
    # through the table of its place in the window, summed, over the window side
    table, want = model.layout_out.weight, torch.zeros(2, 16, 32)
    for y in range(4):
        for x in range(4):
            for dy in range(3):
                for dx in range(3):
                    yy, xx = y + dy - 1, x + dx - 1
                    inside = 0 <= yy < 4 and 0 <= xx < 4
                    cell = layout[:, yy, xx] if inside else torch.zeros(2, dtype=torch.long)
                    row = (dy * 3 + dx) * width
                    want[:, y * 4 + x] += (table[row + cell % 3] + table[row + 3 + cell // 3]) / 3
    skip = model._embed_layout(layout, model.layout_out, 1)
    torch.testing.assert_close(skip, want, rtol=1e-5, atol=1e-5)
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    ctx = model.condition(text=ids, text_mask=mask)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    _, hidden = model.transformer(tokens, *ctx, layout=layout)
    with torch.no_grad():
        saved = model.layout_out.weight.clone()
        model.layout_out.weight.zero_()
        _, without = model.transformer(tokens, *ctx, layout=layout)
        model.layout_out.weight.copy_(saved)
    torch.testing.assert_close(hidden, without + skip, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout_reach"):
        _model(layout="runs/layout", layout_skip=True, layout_reach=-1)


def test_layout_skip_hidden_adds_an_mlp_of_the_skip_features_that_starts_at_zero():
    kw = dict(layout="runs/layout", layout_classes=3, layout_colour=True, layout_detail=1,
              layout_skip=True, layout_reach=1)
    model = _model(**kw, layout_skip_hidden=24).train()
    assert model.layout_mlp[0].out_features == 24
    g = torch.Generator().manual_seed(8)
    layout = torch.randint(0, 3, (2, 4, 4), generator=g) + \
        3 * torch.randint(0, COLOUR_CLASSES, (2, 4, 4), generator=g)
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    ctx = model.condition(text=ids, text_mask=mask)
    tokens = torch.randint(0, 16, (2, 16), generator=g)
    _, hidden = model.transformer(tokens, *ctx, layout=layout)
    _, linear = _model(**kw).transformer(tokens, *ctx, layout=layout)  # same other weights
    torch.testing.assert_close(hidden, linear)  # the MLP's output layer starts at zero
    with torch.no_grad():
        model.layout_mlp[2].weight.normal_(0, 0.1, generator=g)
    _, hidden = model.transformer(tokens, *ctx, layout=layout)
    skip = model._embed_layout(layout, model.layout_out, 1)
    mlp = model.layout_mlp  # by hand: linear, GELU, linear on each token's skip features
    want = torch.nn.functional.gelu(skip @ mlp[0].weight.T + mlp[0].bias) @ mlp[2].weight.T
    torch.testing.assert_close(hidden - linear, want + mlp[2].bias, rtol=1e-4, atol=1e-5)
    features = model.layout_features(layout)  # what decoding computes once a generation
    assert torch.equal(model.transformer(tokens, *ctx, layout=features)[1], hidden)
    loss, _ = model.loss(tokens, torch.ones_like(tokens, dtype=torch.bool), *ctx, layout=layout)
    loss.backward()
    assert mlp[0].weight.grad.abs().sum() > 0 and mlp[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layout_skip_hidden"):
        _model(**kw, layout_skip_hidden=-1)


def test_the_skip_mlp_runs_on_windows_that_touch_an_object_and_one_plain_window():
    kw = dict(layout="runs/layout", layout_classes=3, layout_colour=True, layout_detail=1,
              layout_skip=True, layout_reach=1, layout_skip_hidden=24)
    model = _model(**kw, grid=6).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.layout_mlp[2].weight.normal_(0, 0.1, generator=g)
    layout = torch.zeros(2, 6, 6, dtype=torch.long)
    layout[0, 1, 1] = 1 + 3 * 2  # a class-1 cell of colour 2: windows (0..2, 0..2) busy
    layout[1, 4, 5] = 3 * 1  # background class with a colour is no plain cell either
    rows = []
    hook = model.layout_mlp[0].register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    weights = torch.randn(2, 36, 32, generator=g)

    def grads(mlp):  # the output and the gradients of the table and of the MLP
        model.zero_grad()
        out = mlp(model._embed_layout(layout, model.layout_out, 1))
        (out * weights).sum().backward()
        return out, [p.grad.clone() for p in [model.layout_out.weight,
                                              *model.layout_mlp.parameters()]]

    got, got_grads = grads(lambda skip: model._skip_mlp(skip, layout))
    assert rows == [9 + 6 + 1]  # 3 x 3 windows, 2 x 3 at the edge, one plain
    want, want_grads = grads(model.layout_mlp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    skip = model._embed_layout(layout, model.layout_out, 1)
    busy = torch.ones(2, 6, 6, dtype=torch.long)  # no plain window: every row, once
    model._skip_mlp(skip, busy)
    hook.remove()
    assert rows[-1] == 2 * 36


def test_a_painter_without_layout_shapes_sees_the_footprint_not_the_shape_class():
    model = _model(layout="runs/layout", layout_classes=4, layout_colour=True, layout_detail=2,
                   layout_skip=True, layout_reach=1, layout_shapes=False)
    layout = torch.zeros(1, 8, 8, dtype=torch.long)
    layout[:, 2:5, 3:6] = 1 + 4 * 2  # shape class 1 in colour 2
    other = layout.clone()
    other[layout > 0] = 3 + 4 * 2  # shape class 3, the same cells and colour
    moved = torch.roll(layout, 1, dims=2)
    for reach, table in ((0, model.layout_embed), (1, model.layout_out)):
        def embed(x, reach=reach, table=table):
            return model._embed_layout(x, table, reach)
        torch.testing.assert_close(embed(other), embed(layout))
        assert not torch.allclose(embed(moved), embed(layout))
    shapes = _model(layout="runs/layout", layout_classes=4, layout_colour=True, layout_detail=2)
    assert not torch.allclose(shapes._embed_layout(other, shapes.layout_embed),
                              shapes._embed_layout(layout, shapes.layout_embed))


def test_a_painter_generates_on_the_layouts_its_layout_model_draws_once_a_batch(
        vqgan, monkeypatch):
    drawer = LayoutDrawer(_model(layout_model=True, layout_classes=3), TOKENIZER)
    model = _model(layout="runs/layout", layout_classes=3)
    drawn, seen = [], []
    transformer = model.transformer
    monkeypatch.setattr(model, "transformer",
                        lambda *a, **kw: seen.append(kw.get("layout")) or transformer(*a, **kw))
    gen = MuseGenerator(model, vqgan, TOKENIZER,
                        layouts=lambda *a, **kw: drawn.append(drawer(*a, **kw)) or drawn[-1])
    texts = ["a large red circle on the left", "a small blue ring", "a green cross"]
    out = gen(texts, steps=4, cfg_scale=2.0, seed=0, batch_size=2)
    assert [d.shape for d in drawn] == [(2, 4, 4), (1, 4, 4)]  # once a batch
    assert 0 <= int(drawn[0].min()) and int(drawn[0].max()) < 3
    assert len(seen) == 2 * 4  # one painter call a step, both halves of guidance in it
    # the layout's features, computed once a batch and passed to every step
    assert all(s is seen[0] for s in seen[:4]) and all(s is seen[4] for s in seen[4:])
    for s, d in ((seen[0], drawn[0]), (seen[4], drawn[1])):
        want = model.layout_features(torch.cat([d, d]))
        assert torch.equal(s[0], want[0]) and s[1] is None and want[1] is None  # no skip
    assert torch.equal(out.layout, torch.cat(drawn))
    again = gen(texts, steps=4, cfg_scale=2.0, seed=0, batch_size=2)
    assert torch.equal(out.tokens, again.tokens)
    # a painter decodes with its own defaults, other models with theirs
    assert torch.equal(out.tokens, gen(texts, steps=4, cfg_scale=2.0, seed=0, batch_size=2,
                                       **PAINTER_DECODING).tokens)
    assert not torch.equal(out.tokens, gen(texts, steps=4, cfg_scale=2.0, seed=0,
                                           batch_size=2, **PLAIN_DECODING).tokens)
    plain = MuseGenerator(_model(), vqgan, TOKENIZER)
    assert torch.equal(plain(texts, steps=4, seed=0).tokens,
                       plain(texts, steps=4, seed=0, **PLAIN_DECODING).tokens)
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "reference")
    assert torch.equal(out.tokens, gen(texts, steps=4, cfg_scale=2.0, seed=0,
                                       batch_size=2).tokens)
    assert gen(texts[:1], steps=2, seed=0).layout.shape == (1, 4, 4)  # no guidance too
    seen.clear()  # a super-resolution stage on the painter: its base runs without guidance
    sr = MuseGenerator(_model(low_res_codes=16, low_res_grid=4), vqgan, TOKENIZER,
                       low=LowRes(vqgan, 16), base=gen)
    assert sr(texts[:1], steps=2, cfg_scale=2.0, seed=0).images.shape == (1, 3, 16, 16)
    assert [s[0].shape for s in seen] == [(1, 16, 32)] * 2
    with pytest.raises(ValueError, match="painter"):
        MuseGenerator(model, vqgan, TOKENIZER)  # a painter without its layout model
    with pytest.raises(ValueError, match="painter"):
        MuseGenerator(_model(), vqgan, TOKENIZER, layouts=drawer)
    with pytest.raises(ValueError, match="layout model"):
        LayoutDrawer(_model(), TOKENIZER)


def test_drawn_layouts_have_objects_where_the_background_is_below_the_threshold(vqgan):
    # classes: background, A, B; then two colour scores (none is no score: COLOUR_NAMES)
    probs = torch.tensor([[0.45, 0.35, 0.20], [0.30, 0.20, 0.50], [0.38, 0.31, 0.31],
                          [0.90, 0.05, 0.05]])
    colours = torch.zeros(4, len(COLOUR_NAMES))
    colours[:, 1] = 1.0  # the second scene colour everywhere
    scores = torch.cat([probs.log(), colours], -1)
    assert pick_layout(scores, 3).tolist() == [0, 2 + 3 * 2, 0, 0]  # the most likely class
    assert pick_layout(scores, 3, 0.5).tolist() == [1 + 3 * 2, 2 + 3 * 2, 1 + 3 * 2, 0]
    assert pick_layout(scores, 3, 0.4).tolist() == [0, 2 + 3 * 2, 1 + 3 * 2, 0]
    assert pick_layout(scores, 3, 0.3).tolist() == [0, 0, 0, 0]  # 0.30 is not below 0.3
    drawer = LayoutDrawer(_model(layout_model=True, layout_classes=3), TOKENIZER)
    texts = ["a large red circle on the left", "a small blue ring"]
    ids, mask = TOKENIZER(texts)
    with torch.no_grad():
        logits = drawer.model.layout_logits(*drawer.model.condition(text=ids, text_mask=mask))
    assert (drawer.threshold, drawer.sharpen) == (LAYOUT_THRESHOLD, LAYOUT_SHARPEN)
    assert torch.equal(drawer(texts), pick_layout(logits, 3, LAYOUT_THRESHOLD, LAYOUT_SHARPEN))
    everywhere = drawer(texts, threshold=1.0, sharpen=0)  # every cell an object's
    assert (everywhere > 0).all() and torch.equal(everywhere, pick_layout(logits, 3, 1.0))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            drawer(texts, threshold=bad)
    with pytest.raises(ValueError, match="sharpen"):
        drawer(texts, sharpen=-1)
    gen = MuseGenerator(_model(layout="runs/layout", layout_classes=3), vqgan, TOKENIZER,
                        layouts=drawer)
    assert torch.equal(gen(texts, steps=2, seed=0, layout_threshold=1.0,
                           layout_sharpen=0).layout, everywhere)
    assert torch.equal(gen(texts, steps=2, seed=0).layout, drawer(texts))
    for option in ({"layout_threshold": 0.5}, {"layout_sharpen": 1.0}):
        with pytest.raises(ValueError, match="painter"):
            MuseGenerator(_model(), vqgan, TOKENIZER)(texts, steps=2, **option)


def test_sharpening_restores_the_corners_a_blurred_outline_lost():
    # a 3 x 3 object whose layout-model probabilities came out rounded: its corners' background
    # probability 0.45, its other cells 0.1, the cells around it 0.9
    background = torch.full((1, 5, 5), 0.9)
    background[0, 1:4, 1:4] = 0.1
    background[0, 1:4:2, 1:4:2] = 0.45
    objects = (1 - background)[..., None]
    scores = torch.cat([background[..., None], objects * 0.7, objects * 0.3], -1).log()
    block = torch.zeros(1, 5, 5, dtype=torch.long)
    block[0, 1:4, 1:4] = 1  # the most likely object class
    rounded = block.clone()
    rounded[0, 1:4:2, 1:4:2] = 0
    assert torch.equal(pick_layout(scores, 3, 0.4), rounded)
    # by hand, the corner (1, 1): blur = (4 x 0.45 + 2 x (0.9 + 0.9 + 0.1 + 0.1) + (0.9 + 0.9 +
    # 0.9 + 0.1)) / 16 = 0.5375, so 0.45 + 3 x (0.45 - 0.5375) = 0.1875 < 0.4: an object's
    assert torch.equal(pick_layout(scores, 3, 0.4, sharpen=3.0), block)
    assert torch.equal(pick_layout(scores, 3, 0.4, sharpen=0.5), rounded)  # 0.406: not yet
    with pytest.raises(ValueError, match="sharpen"):
        pick_layout(scores[0], 3, 0.4, sharpen=1.0)  # needs [B, S, S, W] maps


def test_shape_word_nll_compares_the_caption_with_its_shape_swapped(monkeypatch):
    model = _model()
    captions = ["a large red ring on the left", "a blue bar at the top and a red disk below",
                "a small green disk in the centre"]
    records = [{"objects": [{"shape": "ring"}]}, {"objects": [{}, {}]},
               {"objects": [{"shape": "circle"}]}]
    seg = torch.zeros(3, 8, 8, dtype=torch.long)
    seg[0, 0:4, 0:2] = 6  # tokens (0, 0) and (1, 0) of the 4 x 4 grid
    seg[0, 5, 5] = 6  # a quarter of token (2, 2): under half, not counted
    seg[2, 2:4, 2:6] = 1  # tokens (1, 1) and (1, 2)
    tokens = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    true, swapped, count = shape_word_nll(model, tokens, seg, captions, records, TOKENIZER)
    assert count == 4  # two object tokens in each single-object scene, none from the second

    def nll(texts, rows):  # by hand: all masked, cross-entropy of the object tokens
        ids, mask = TOKENIZER(texts)
        logits, _ = model.transformer(torch.full((2, 16), model.mask_id),
                                      *model.condition(text=ids, text_mask=mask))
        return sum(float(-logits[r].log_softmax(-1)[t, tokens[i, t]])
                   for r, (i, toks) in enumerate(rows) for t in toks)

    rows = [(0, [0, 4]), (2, [5, 6])]
    with torch.no_grad():
        assert true == pytest.approx(nll([captions[0], captions[2]], rows), rel=1e-5)
        # ring -> bar, circle -> square (the next shape in SHAPES)
        assert swapped == pytest.approx(nll(["a large red bar on the left",
                                             "a small green square in the centre"], rows),
                                        rel=1e-5)
    assert swapped != true  # an untrained model still reads the word
    # a model deaf to the caption gains nothing from the shape word
    monkeypatch.setattr(model, "condition", lambda text, text_mask: model.null_condition(
        len(text)))
    true, swapped, _ = shape_word_nll(model, tokens, seg, captions, records, TOKENIZER)
    assert true == swapped
    assert shape_word_nll(model, tokens, seg, captions[1:2] * 3, [records[1]] * 3,
                          TOKENIZER) is None  # no single-object scene


def test_all_dropped_condition_skips_the_text_but_attends_the_same():
    model = _model()
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    tokens = torch.randint(0, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    drop = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        ctx, ctx_mask = model.condition(text=ids, text_mask=mask, drop=True)
        assert ctx.shape[1] == 1  # the null vector alone: the text encoder did not run
        hidden_null = model.transformer(tokens, ctx, ctx_mask)[1]
        # the general path: text states computed, then hidden behind the null vector
        full = model._drop(*model.condition(text=ids, text_mask=mask), drop)
        hidden_full = model.transformer(tokens, *full)[1]
    torch.testing.assert_close(hidden_null, hidden_full, rtol=1e-5, atol=1e-5)


def test_masking_schedules_hit_their_endpoints():
    for schedule in ("cosine", "arccos", "linear"):
        assert float(mask_ratio(0.0, schedule)) == pytest.approx(1.0)
        assert float(mask_ratio(1.0, schedule)) == pytest.approx(0.0, abs=1e-7)
        counts = masked_counts(64, 12, schedule)
        assert counts[-1] == 0 and all(a > b for a, b in zip([64] + counts, counts, strict=False))
    assert masked_counts(5, 12, "cosine")[4:] == [0] * 8  # more steps than tokens
    with pytest.raises(ValueError):
        mask_ratio(0.5, "square")
    masks = random_mask(1000, 16, "cosine", "cpu", torch.Generator().manual_seed(0))
    assert masks.sum(1).min() >= 1 and masks.sum(1).max() == 16


def test_generation_starts_all_masked_and_ends_with_none(vqgan):
    gen = MuseGenerator(_model(), vqgan, TOKENIZER)
    out = gen(["a red circle", "two blue bars"], steps=5, seed=0, return_steps=True)
    assert out.images.shape == (2, 3, 16, 16) and out.tokens.shape == (2, 4, 4)
    masked = [int((s == 16).sum()) for s in out.steps]
    assert masked == [2 * k for k in masked_counts(16, 5, "cosine")] and masked[-1] == 0
    assert out.tokens.max() < 16 and len(out.pil) == 2
    # a token fixed at one step is never changed later (no remask_fixed)
    for before, after in zip(out.steps, out.steps[1:], strict=False):
        fixed = before != 16
        assert torch.equal(before[fixed], after[fixed])


def test_the_head_runs_on_exactly_the_positions_asked_for(vqgan):
    model = _model()
    gen = MuseGenerator(model, vqgan, TOKENIZER)
    ids, mask = TOKENIZER(["a red circle", "a small blue ring"])
    ctx = model.condition(text=ids, text_mask=mask)
    tokens = torch.randint(0, 17, (2, 16), generator=torch.Generator().manual_seed(4))
    where = torch.tensor([[0, 3, 7, 15], [1, 2, 8, 9]])  # different positions per row
    with torch.no_grad():
        picked, _ = gen._logits(tokens, *ctx, None, where)
        full, _ = model.transformer(tokens, *ctx)
    torch.testing.assert_close(picked, full[torch.arange(2)[:, None], where])


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def gnu_get_libc_version(self):
        return b"2.99"


def test_cpu_generation_keeps_freed_heap_once_unless_told_not_to(vqgan, monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(generate.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(generate, "_heap_kept", None)  # not tried yet
    gen = MuseGenerator(_model(), vqgan, TOKENIZER)
    monkeypatch.setenv("T2I_MALLOC", "system")
    gen(["a red circle"], steps=2, seed=0)
    assert libc.calls == [] and not generate.keep_freed_heap()
    monkeypatch.delenv("T2I_MALLOC")
    gen(["a red circle"], steps=2, seed=0)
    gen(["a red circle"], steps=2, seed=0)  # once a process
    # glibc's M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1)
    assert libc.calls == [(-3, 64 << 20), (-1, 256 << 20)] and generate.keep_freed_heap()
    monkeypatch.setattr(generate, "_heap_kept", None)  # not tried yet
    monkeypatch.setattr(generate.ctypes, "CDLL", lambda name: object())  # not glibc
    assert not generate.keep_freed_heap()


def test_seeded_generation_is_reproducible_and_seeds_differ(vqgan):
    gen = MuseGenerator(_model(), vqgan, TOKENIZER)
    a = gen(["a red circle"] * 3, steps=4, cfg_scale=2.0, seed=1)
    b = gen(["a red circle"] * 3, steps=4, cfg_scale=2.0, seed=1)
    c = gen(["a red circle"] * 3, steps=4, cfg_scale=2.0, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    # batching does not change what a prompt gets... given the same generator stream per batch
    d = gen(["a red circle"] * 3, steps=4, cfg_scale=2.0, seed=1, batch_size=3)
    assert torch.equal(a.tokens, d.tokens)


def test_cfg_scale_zero_is_the_unconditional_model(vqgan):
    model = _model()
    gen = MuseGenerator(model, vqgan, TOKENIZER)
    guided = gen(["a red circle", "a green bar"], steps=4, cfg_scale=0.0, seed=3)

    class Unconditional(torch.nn.Module):  # the same model, always given the null condition
        def __init__(self):
            super().__init__()
            self.inner, self.head = model, model.head
            self.config, self.mask_id, self.num_tokens = model.config, model.mask_id, 16

        def condition(self, **kw):
            kw["drop"] = torch.ones(len(kw["text"]), dtype=torch.bool)
            return model.condition(**kw)

        def transformer(self, *args, **kw):
            return model.transformer(*args, **kw)

    plain = MuseGenerator(Unconditional(), vqgan, TOKENIZER)(
        ["a red circle", "a green bar"], steps=4, seed=3)
    assert torch.equal(guided.tokens, plain.tokens)
    conditional = gen(["a red circle", "a green bar"], steps=4, seed=3)
    assert torch.equal(gen(["a red circle", "a green bar"], steps=4, cfg_scale=1.0,
                           seed=3).tokens, conditional.tokens)


@pytest.mark.parametrize("critic,remask_fixed", [(None, False), ("self", False), (None, True)])
def test_kernel_torch_path_equals_the_reference_token_for_token(vqgan, monkeypatch, critic,
                                                                remask_fixed):
    gen = MuseGenerator(_model(), vqgan, TOKENIZER)
    kwargs = dict(steps=6, cfg_scale=2.5, top_k=8, temperature=(1.0, 0.5), seed=4,
                  critic=critic, remask_fixed=remask_fixed)
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "torch")
    fast = gen(["a large red circle on the left", "a small blue ring"], **kwargs)
    monkeypatch.setenv("T2I_KERNEL_BACKEND", "reference")
    ref = gen(["a large red circle on the left", "a small blue ring"], **kwargs)
    assert torch.equal(fast.tokens, ref.tokens)


def test_class_conditional_and_self_conditioned_models_generate(vqgan):
    model = _model(condition="class", num_classes=7, self_condition=True)
    out = MuseGenerator(model, vqgan)(class_ids=[0, 3, 6], steps=3, cfg_scale=2.0, seed=0)
    assert out.tokens.shape == (3, 4, 4)
    with pytest.raises(ValueError, match="class ids"):
        MuseGenerator(model, vqgan)(class_ids=[7], steps=3)


def test_bad_generation_input_is_a_clear_error(vqgan):
    gen = MuseGenerator(_model(), vqgan, TOKENIZER)
    with pytest.raises(ValueError, match="no prompts"):
        gen([], steps=2)
    with pytest.raises(ValueError, match="empty"):
        gen(["a red circle", "  "], steps=2)
    with pytest.raises(ValueError, match="steps"):
        gen(["a red circle"], steps=0)
    with pytest.raises(ValueError, match="schedule"):
        gen(["a red circle"], schedule="square")
    with pytest.warns(UserWarning, match="truncated"):
        gen(["a red circle " * 10], steps=2)
    with pytest.raises(ValueError, match="negative"):
        gen(["a", "b"], negative_texts=["c"], cfg_scale=2.0)
    no_dropout = MuseGenerator(_model(cond_dropout=0.0), vqgan, TOKENIZER)
    with pytest.warns(UserWarning, match="without condition dropout"):
        no_dropout(["a red circle"], steps=2, cfg_scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        no_dropout(["a red circle"], steps=2)  # no guidance asked: no warning
    assert os.environ.get("T2I_KERNEL_BACKEND") in (None, "", "torch", "reference", "triton")


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_on_cuda_the_kernels_train_like_the_reference_and_generate(vqgan, monkeypatch):
    """The whole model on a GPU: Triton attention and cross-entropy (tf32 dots) against the
    fp32 reference path, then seeded generation through the Triton sampling kernels."""
    model = _model(self_condition=True, local_kernel=3).cuda().train()
    ids, mask = TOKENIZER(["a red circle on the left", "a small blue ring at the top"])
    batch = {"text": ids.cuda(), "text_mask": mask.cuda(), "drop": torch.tensor([True, False],
                                                                               device="cuda")}
    tokens = torch.randint(0, 16, (2, 16), device="cuda")
    masked = random_mask(2, 16, "cosine", "cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("T2I_KERNEL_BACKEND", backend)
        model.zero_grad()
        torch.manual_seed(1)  # the same self-conditioning draw
        loss, _ = model(tokens, masked, batch, torch.tensor([True, True], device="cuda"),
                        mode="loss")
        loss.backward()
        results[backend] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for got, want in zip(results["triton"], results["reference"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    monkeypatch.delenv("T2I_KERNEL_BACKEND")
    gen = MuseGenerator(model.eval(), vqgan.cuda(), TOKENIZER)
    first = gen(["a large red circle on the left", "a small blue ring"], steps=6, cfg_scale=2.5,
                top_k=8, seed=4)
    again = gen(["a large red circle on the left", "a small blue ring"], steps=6, cfg_scale=2.5,
                top_k=8, seed=4)
    assert first.tokens.is_cuda and torch.equal(first.tokens, again.tokens)
    assert ((first.tokens >= 0) & (first.tokens < 16)).all()
    vqgan.cpu()
