"""Make reference outputs of a TINY random mmdet-2.x Mask2Former (instance seg): tests/data/mask2former_mmdet/.

GenEval's detector architecture (mmdet's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py) with only
its sizes made tiny (config overrides below) and a small test scale (96, 64), run by mmdet's own
init_detector / inference_detector on PNG paths as GenEval does. tests/test_geneval.py converts the
checkpoint with stitchvm_rl/evaluation/mmdet_convert.py and compares. In a scratch environment:

    python3.11 -m venv /tmp/mmdet && /tmp/mmdet/bin/pip install torch==2.13.0 "setuptools==69.5.1"
    MMCV_WITH_OPS=0 /tmp/mmdet/bin/pip install --no-deps --no-build-isolation mmcv==1.7.1
    /tmp/mmdet/bin/pip install --no-deps mmdet==2.28.2 "numpy<2" opencv-python-headless==4.10.0.84 scipy==1.13.1 \
        matplotlib==3.8.4 yapf==0.32.0 pycocotools terminaltables addict six pyyaml pillow packaging
    /tmp/mmdet/bin/python tests/mask2former_official.py          # writes /tmp/mmdet_small; copy into tests/data/mask2former_mmdet
"""
import os
import os.path as osp
import sys
import types
import json

# ---------------------------------------------------------------------------
# Workaround 1: mmcv "lite" has no compiled mmcv._ext.  mmdet imports mmcv.ops
# (MultiScaleDeformableAttention, RoIPool, nms, ...) whose modules call
# ext_loader.load_ext('_ext', [...]) at import time.  Register a stub module
# whose attributes are functions that RAISE, and record any call, so that we
# can prove no compiled op is used during inference (on CPU,
# MultiScaleDeformableAttention falls back to multi_scale_deformable_attn_pytorch).
# ---------------------------------------------------------------------------
STUB_CALLS = []


class _StubExt(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)

        def _stub(*args, **kwargs):
            STUB_CALLS.append(name)
            raise RuntimeError(f'stubbed mmcv._ext.{name} was called')

        _stub.__name__ = name
        return _stub


sys.modules['mmcv._ext'] = _StubExt('mmcv._ext')

# ---------------------------------------------------------------------------
# Workaround 2: mmcv/runner/checkpoint.py does a module-level
# `import torchvision`, but only uses it to resolve 'torchvision://' model-zoo
# URLs (never here).  The only torchvision 2.13-compatible wheel available is a
# CUDA build whose _C.so cannot load against torch 2.13.0+cpu (import fails),
# so register a stub torchvision whose `models` attribute raises if touched.
# ---------------------------------------------------------------------------
try:
    import torchvision  # noqa: F401
except Exception:
    _tv = _StubExt('torchvision')
    _tv.__version__ = '0.28.0'
    sys.modules['torchvision'] = _tv

import numpy as np  # noqa: E402
import torch  # noqa: E402
import cv2  # noqa: E402
import mmcv  # noqa: E402
import mmdet  # noqa: E402
from mmcv import Config  # noqa: E402
from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmdet.models import build_detector  # noqa: E402
from mmdet.core import get_classes  # noqa: E402

ROOT = '/tmp/mmdet_small'
CFG_PATH = osp.join(
    osp.dirname(mmdet.__file__), '.mim', 'configs', 'mask2former',
    'mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py')
CKPT = osp.join(ROOT, 'mask2former_tiny.pth')
IMG_DIR = osp.join(ROOT, 'images')

# ---------------------------------------------------------------------------
# Config: mmdet's own file + _base_ chain, tiny sizes only via overrides.
# ---------------------------------------------------------------------------
E = 32     # feat_channels / out_channels / all transformer embed_dims
FFN = 64
HEADS = 2
tiny_override = {
    # Swin backbone
    'model.backbone.embed_dims': 8,
    'model.backbone.depths': [2, 2, 2, 2],   # 2 per stage => shifted windows
    'model.backbone.num_heads': [1, 1, 2, 2],
    'model.backbone.window_size': 7,
    'model.backbone.pretrain_img_size': 224,
    'model.backbone.init_cfg': None,
    # head
    'model.panoptic_head.in_channels': [8, 16, 32, 64],
    'model.panoptic_head.feat_channels': E,
    'model.panoptic_head.out_channels': E,
    'model.panoptic_head.num_queries': 20,
    'model.panoptic_head.positional_encoding.num_feats': E // 2,
    # pixel decoder
    'model.panoptic_head.pixel_decoder.norm_cfg': dict(type='GN', num_groups=32),
    'model.panoptic_head.pixel_decoder.positional_encoding.num_feats': E // 2,
    'model.panoptic_head.pixel_decoder.encoder.num_layers': 1,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.attn_cfgs.embed_dims': E,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.attn_cfgs.num_heads': HEADS,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.attn_cfgs.num_levels': 3,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.attn_cfgs.num_points': 4,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.ffn_cfgs.embed_dims': E,
    'model.panoptic_head.pixel_decoder.encoder.transformerlayers.ffn_cfgs.feedforward_channels': FFN,
    # transformer decoder
    'model.panoptic_head.transformer_decoder.num_layers': 2,
    'model.panoptic_head.transformer_decoder.transformerlayers.attn_cfgs.embed_dims': E,
    'model.panoptic_head.transformer_decoder.transformerlayers.attn_cfgs.num_heads': HEADS,
    'model.panoptic_head.transformer_decoder.transformerlayers.ffn_cfgs.embed_dims': E,
    'model.panoptic_head.transformer_decoder.transformerlayers.ffn_cfgs.feedforward_channels': FFN,
    'model.panoptic_head.transformer_decoder.transformerlayers.feedforward_channels': FFN,
}

cfg = Config.fromfile(CFG_PATH)
cfg.merge_from_dict(tiny_override)
cfg.data.test.pipeline[1].img_scale = (96, 64)  # a small test scale: small reference files
# sanity of the things we keep from the config
assert cfg.model.panoptic_head.num_things_classes == 80
assert cfg.model.panoptic_head.num_stuff_classes == 0
assert cfg.model.test_cfg.panoptic_on is False
assert cfg.model.test_cfg.instance_on is True
assert cfg.model.test_cfg.max_per_image == 100
os.makedirs(ROOT, exist_ok=True)
cfg.dump(osp.join(ROOT, 'mask2former_tiny_config.py'))
with open(osp.join(ROOT, 'config_overrides.json'), 'w') as f:
    json.dump(tiny_override, f, indent=1)
print('test pipeline:', cfg.data.test.pipeline)

# ---------------------------------------------------------------------------
# Build + random init + noise + class-bias, save checkpoint
# ---------------------------------------------------------------------------
torch.manual_seed(0)
np.random.seed(0)
build_cfg = cfg.copy()
build_cfg.model.train_cfg = None
model = build_detector(build_cfg.model, test_cfg=build_cfg.get('test_cfg'))
model.init_weights()
CLS_W_SCALE = float(os.environ.get('CLS_W_SCALE', 4.0))
MASK_W_SCALE = float(os.environ.get('MASK_W_SCALE', 3.0))
g = torch.Generator().manual_seed(1234)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    BOOST = {16: 'dog', 15: 'cat', 2: 'car'}
    coco = get_classes('coco')
    for k, v in BOOST.items():
        assert coco[k] == v, (k, coco[k])
        model.panoptic_head.cls_embed.bias[k] += 4.0
    # Make the (otherwise nearly query-independent) class logits and the
    # (otherwise ~0.5-sigmoid) mask logits more decisive, so that queries
    # disagree about classes and some final scores exceed 0.3.
    model.panoptic_head.cls_embed.weight.mul_(CLS_W_SCALE)
    model.panoptic_head.mask_embed[-1].weight.mul_(MASK_W_SCALE)
    model.panoptic_head.mask_embed[-1].bias.mul_(MASK_W_SCALE)

sd = model.state_dict()
meta = dict(
    CLASSES=tuple(get_classes('coco')),
    mmdet_version=mmdet.__version__,
    mmcv_version=mmcv.__version__,
    torch_version=str(torch.__version__),
    config=cfg.pretty_text,
    note='TINY random Mask2Former (seed 0, N(0,0.02) noise seed 1234, '
         f'cls_embed.bias[16,15,2] += 4, cls_embed.weight *= {CLS_W_SCALE}, '
         f'mask_embed[-1].weight/bias *= {MASK_W_SCALE})',
)
torch.save({'state_dict': sd, 'meta': meta}, CKPT)
print('checkpoint', CKPT, os.path.getsize(CKPT), 'bytes;',
      sum(v.numel() for v in sd.values()), 'elements;', len(sd), 'keys')
with open(osp.join(ROOT, 'keys.txt'), 'w') as f:
    for k, v in sd.items():
        f.write(f'{k}\t{tuple(v.shape)}\t{str(v.dtype)}\n')

# ---------------------------------------------------------------------------
# Test images (RGB PNGs, smooth-ish, numpy RandomState(0))
# ---------------------------------------------------------------------------
os.makedirs(IMG_DIR, exist_ok=True)
rs = np.random.RandomState(0)
sizes = {'img_h48_w64': (48, 64), 'img_h80_w40': (80, 40),
         'img_h37_w53': (37, 53)}
img_paths = {}
for name, (h, w) in sizes.items():
    coarse = rs.uniform(0, 255, size=(max(h // 8, 2), max(w // 8, 2), 3))
    smooth = cv2.resize(coarse.astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    smooth = smooth + rs.normal(0, 6, size=smooth.shape)
    rgb = np.clip(np.round(smooth), 0, 255).astype(np.uint8)
    path = osp.join(IMG_DIR, name + '.png')
    # cv2 writes BGR -> flip so that the PNG file holds `rgb` as RGB
    assert cv2.imwrite(path, rgb[:, :, ::-1].copy())
    img_paths[name] = path

# ---------------------------------------------------------------------------
# Inference exactly as GenEval: init_detector(cfg, ckpt) + inference_detector
# ---------------------------------------------------------------------------
det = init_detector(cfg, CKPT, device='cpu')
assert det.CLASSES[16] == 'dog'
# the loaded weights are exactly the saved ones
sd2 = det.state_dict()
assert sd2.keys() == sd.keys()
assert all(torch.equal(sd[k], sd2[k]) for k in sd)

captured = {}


def head_hook(mod, inputs, outputs):
    all_cls_scores, all_mask_preds = outputs
    captured['cls'] = all_cls_scores[-1].detach().clone()
    captured['mask'] = all_mask_preds[-1].detach().clone()
    captured['n_layers_out'] = len(all_cls_scores)


det.panoptic_head.register_forward_hook(head_hook)
_orig_simple_test = det.simple_test


def simple_test_capture(img, img_metas, **kwargs):
    captured['img'] = img.detach().clone()
    captured['img_metas'] = [dict(m) for m in img_metas]
    return _orig_simple_test(img, img_metas, **kwargs)


det.simple_test = simple_test_capture

summary = {}
for name, path in img_paths.items():
    captured.clear()
    result = inference_detector(det, path)
    bbox_result, segm_result = result
    assert len(bbox_result) == 80 and len(segm_result) == 80
    boxes, labels, masks = [], [], []
    for c in range(80):
        b = bbox_result[c]
        assert b.dtype == np.float32 and b.shape[1] == 5
        assert len(segm_result[c]) == len(b)
        for i in range(len(b)):
            boxes.append(b[i])
            labels.append(c)
            masks.append(segm_result[c][i])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 5)
    labels = np.asarray(labels, np.int64)
    masks = np.asarray(masks, bool)
    meta0 = captured['img_metas'][0]
    ori_h, ori_w = meta0['ori_shape'][:2]
    masks = masks.reshape(-1, ori_h, ori_w)
    img_t = captured['img'][0].float()
    cls_logits = captured['cls'][0].float().numpy()
    mask_logits = captured['mask'][0].float().numpy()
    out = dict(
        # boxes: (N, 6) = [class, x1, y1, x2, y2, score], in bbox2result order
        boxes=np.concatenate([labels[:, None].astype(np.float32), boxes], 1),
        labels=labels,
        scores=boxes[:, 4].copy(),
        masks_packed=np.packbits(masks.reshape(-1)),
        masks_shape=np.asarray(masks.shape, np.int64),
        cls_logits=cls_logits,            # (Q, 81) last decoder layer
        mask_logits=mask_logits,          # (Q, H/4, W/4) of padded input
        input_tensor=img_t.numpy().astype(np.float32),  # (3, Hpad, Wpad)
        input_shape=np.asarray(img_t.shape, np.int64),
        input_sum=np.float64(img_t.double().sum().item()),
        img_shape=np.asarray(meta0['img_shape'], np.int64),
        pad_shape=np.asarray(meta0['pad_shape'], np.int64),
        ori_shape=np.asarray(meta0['ori_shape'], np.int64),
        batch_input_shape=np.asarray(meta0['batch_input_shape'], np.int64),
        scale_factor=np.asarray(meta0['scale_factor'], np.float32),
        img_norm_mean=np.asarray(meta0['img_norm_cfg']['mean'], np.float32),
        img_norm_std=np.asarray(meta0['img_norm_cfg']['std'], np.float32),
        original_rgb=cv2.imread(path)[:, :, ::-1].copy(),
    )
    npz = osp.join(ROOT, f'reference_{name}.npz')
    np.savez_compressed(npz, **out)
    s = boxes[:, 4]
    order = np.argsort(-s)
    summary[name] = dict(
        ori_shape=list(meta0['ori_shape']), img_shape=list(meta0['img_shape']),
        pad_shape=list(meta0['pad_shape']),
        batch_input_shape=list(meta0['batch_input_shape']),
        scale_factor=[float(x) for x in meta0['scale_factor']],
        input_sum=float(out['input_sum']),
        cls_logits_shape=list(cls_logits.shape),
        mask_logits_shape=list(mask_logits.shape),
        n_decoder_outputs=captured['n_layers_out'],
        n_dets=int(len(s)), n_above_0_3=int((s > 0.3).sum()),
        top5=[(int(labels[i]), get_classes('coco')[labels[i]],
               round(float(s[i]), 5), [round(float(x), 2) for x in boxes[i, :4]],
               int(masks[i].sum())) for i in order[:5]],
        npz_bytes=os.path.getsize(npz),
    )
    print(name, json.dumps(summary[name]))

with open(osp.join(ROOT, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
assert not STUB_CALLS, STUB_CALLS
print('stubbed mmcv._ext functions called during inference:', STUB_CALLS)
print('done')
