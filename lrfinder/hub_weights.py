"""Hub cache file names of torchvision's pretrained weights.

Generated from torchvision 0.29.1 by scripts/generate_hub_weights.py; do not
edit by hand. A test checks it against the installed torchvision. Pure Python,
so the API can check a weights name and its file without importing torch.
"""

from __future__ import annotations

# model name: {weights name: file name under $TORCH_HOME/hub/checkpoints}
TORCHVISION_WEIGHTS_FILES: dict[str, dict[str, str]] = {
    "alexnet": {
        "DEFAULT": "alexnet-owt-7be5be79.pth",
        "IMAGENET1K_V1": "alexnet-owt-7be5be79.pth",
    },
    "convnext_base": {
        "DEFAULT": "convnext_base-6075fbad.pth",
        "IMAGENET1K_V1": "convnext_base-6075fbad.pth",
    },
    "convnext_large": {
        "DEFAULT": "convnext_large-ea097f82.pth",
        "IMAGENET1K_V1": "convnext_large-ea097f82.pth",
    },
    "convnext_small": {
        "DEFAULT": "convnext_small-0c510722.pth",
        "IMAGENET1K_V1": "convnext_small-0c510722.pth",
    },
    "convnext_tiny": {
        "DEFAULT": "convnext_tiny-983f1562.pth",
        "IMAGENET1K_V1": "convnext_tiny-983f1562.pth",
    },
    "densenet121": {
        "DEFAULT": "densenet121-a639ec97.pth",
        "IMAGENET1K_V1": "densenet121-a639ec97.pth",
    },
    "densenet161": {
        "DEFAULT": "densenet161-8d451a50.pth",
        "IMAGENET1K_V1": "densenet161-8d451a50.pth",
    },
    "densenet169": {
        "DEFAULT": "densenet169-b2777c0a.pth",
        "IMAGENET1K_V1": "densenet169-b2777c0a.pth",
    },
    "densenet201": {
        "DEFAULT": "densenet201-c1103571.pth",
        "IMAGENET1K_V1": "densenet201-c1103571.pth",
    },
    "efficientnet_b0": {
        "DEFAULT": "efficientnet_b0_rwightman-7f5810bc.pth",
        "IMAGENET1K_V1": "efficientnet_b0_rwightman-7f5810bc.pth",
    },
    "efficientnet_b1": {
        "DEFAULT": "efficientnet_b1-c27df63c.pth",
        "IMAGENET1K_V1": "efficientnet_b1_rwightman-bac287d4.pth",
        "IMAGENET1K_V2": "efficientnet_b1-c27df63c.pth",
    },
    "efficientnet_b2": {
        "DEFAULT": "efficientnet_b2_rwightman-c35c1473.pth",
        "IMAGENET1K_V1": "efficientnet_b2_rwightman-c35c1473.pth",
    },
    "efficientnet_b3": {
        "DEFAULT": "efficientnet_b3_rwightman-b3899882.pth",
        "IMAGENET1K_V1": "efficientnet_b3_rwightman-b3899882.pth",
    },
    "efficientnet_b4": {
        "DEFAULT": "efficientnet_b4_rwightman-23ab8bcd.pth",
        "IMAGENET1K_V1": "efficientnet_b4_rwightman-23ab8bcd.pth",
    },
    "efficientnet_b5": {
        "DEFAULT": "efficientnet_b5_lukemelas-1a07897c.pth",
        "IMAGENET1K_V1": "efficientnet_b5_lukemelas-1a07897c.pth",
    },
    "efficientnet_b6": {
        "DEFAULT": "efficientnet_b6_lukemelas-24a108a5.pth",
        "IMAGENET1K_V1": "efficientnet_b6_lukemelas-24a108a5.pth",
    },
    "efficientnet_b7": {
        "DEFAULT": "efficientnet_b7_lukemelas-c5b4e57e.pth",
        "IMAGENET1K_V1": "efficientnet_b7_lukemelas-c5b4e57e.pth",
    },
    "efficientnet_v2_l": {
        "DEFAULT": "efficientnet_v2_l-59c71312.pth",
        "IMAGENET1K_V1": "efficientnet_v2_l-59c71312.pth",
    },
    "efficientnet_v2_m": {
        "DEFAULT": "efficientnet_v2_m-dc08266a.pth",
        "IMAGENET1K_V1": "efficientnet_v2_m-dc08266a.pth",
    },
    "efficientnet_v2_s": {
        "DEFAULT": "efficientnet_v2_s-dd5fe13b.pth",
        "IMAGENET1K_V1": "efficientnet_v2_s-dd5fe13b.pth",
    },
    "googlenet": {
        "DEFAULT": "googlenet-1378be20.pth",
        "IMAGENET1K_V1": "googlenet-1378be20.pth",
    },
    "inception_v3": {
        "DEFAULT": "inception_v3_google-0cc3c7bd.pth",
        "IMAGENET1K_V1": "inception_v3_google-0cc3c7bd.pth",
    },
    "maxvit_t": {
        "DEFAULT": "maxvit_t-bc5ab103.pth",
        "IMAGENET1K_V1": "maxvit_t-bc5ab103.pth",
    },
    "mnasnet0_5": {
        "DEFAULT": "mnasnet0.5_top1_67.823-3ffadce67e.pth",
        "IMAGENET1K_V1": "mnasnet0.5_top1_67.823-3ffadce67e.pth",
    },
    "mnasnet0_75": {
        "DEFAULT": "mnasnet0_75-7090bc5f.pth",
        "IMAGENET1K_V1": "mnasnet0_75-7090bc5f.pth",
    },
    "mnasnet1_0": {
        "DEFAULT": "mnasnet1.0_top1_73.512-f206786ef8.pth",
        "IMAGENET1K_V1": "mnasnet1.0_top1_73.512-f206786ef8.pth",
    },
    "mnasnet1_3": {
        "DEFAULT": "mnasnet1_3-a4c69d6f.pth",
        "IMAGENET1K_V1": "mnasnet1_3-a4c69d6f.pth",
    },
    "mobilenet_v2": {
        "DEFAULT": "mobilenet_v2-7ebf99e0.pth",
        "IMAGENET1K_V1": "mobilenet_v2-b0353104.pth",
        "IMAGENET1K_V2": "mobilenet_v2-7ebf99e0.pth",
    },
    "mobilenet_v3_large": {
        "DEFAULT": "mobilenet_v3_large-5c1a4163.pth",
        "IMAGENET1K_V1": "mobilenet_v3_large-8738ca79.pth",
        "IMAGENET1K_V2": "mobilenet_v3_large-5c1a4163.pth",
    },
    "mobilenet_v3_small": {
        "DEFAULT": "mobilenet_v3_small-047dcff4.pth",
        "IMAGENET1K_V1": "mobilenet_v3_small-047dcff4.pth",
    },
    "regnet_x_16gf": {
        "DEFAULT": "regnet_x_16gf-ba3796d7.pth",
        "IMAGENET1K_V1": "regnet_x_16gf-2007eb11.pth",
        "IMAGENET1K_V2": "regnet_x_16gf-ba3796d7.pth",
    },
    "regnet_x_1_6gf": {
        "DEFAULT": "regnet_x_1_6gf-a12f2b72.pth",
        "IMAGENET1K_V1": "regnet_x_1_6gf-e3633e7f.pth",
        "IMAGENET1K_V2": "regnet_x_1_6gf-a12f2b72.pth",
    },
    "regnet_x_32gf": {
        "DEFAULT": "regnet_x_32gf-6eb8fdc6.pth",
        "IMAGENET1K_V1": "regnet_x_32gf-9d47f8d0.pth",
        "IMAGENET1K_V2": "regnet_x_32gf-6eb8fdc6.pth",
    },
    "regnet_x_3_2gf": {
        "DEFAULT": "regnet_x_3_2gf-7071aa85.pth",
        "IMAGENET1K_V1": "regnet_x_3_2gf-f342aeae.pth",
        "IMAGENET1K_V2": "regnet_x_3_2gf-7071aa85.pth",
    },
    "regnet_x_400mf": {
        "DEFAULT": "regnet_x_400mf-62229a5f.pth",
        "IMAGENET1K_V1": "regnet_x_400mf-adf1edd5.pth",
        "IMAGENET1K_V2": "regnet_x_400mf-62229a5f.pth",
    },
    "regnet_x_800mf": {
        "DEFAULT": "regnet_x_800mf-94a99ebd.pth",
        "IMAGENET1K_V1": "regnet_x_800mf-ad17e45c.pth",
        "IMAGENET1K_V2": "regnet_x_800mf-94a99ebd.pth",
    },
    "regnet_x_8gf": {
        "DEFAULT": "regnet_x_8gf-2b70d774.pth",
        "IMAGENET1K_V1": "regnet_x_8gf-03ceed89.pth",
        "IMAGENET1K_V2": "regnet_x_8gf-2b70d774.pth",
    },
    "regnet_y_128gf": {
        "DEFAULT": "regnet_y_128gf_swag-c8ce3e52.pth",
        "IMAGENET1K_SWAG_E2E_V1": "regnet_y_128gf_swag-c8ce3e52.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "regnet_y_128gf_lc_swag-cbe8ce12.pth",
    },
    "regnet_y_16gf": {
        "DEFAULT": "regnet_y_16gf-3e4a00f9.pth",
        "IMAGENET1K_SWAG_E2E_V1": "regnet_y_16gf_swag-43afe44d.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "regnet_y_16gf_lc_swag-f3ec0043.pth",
        "IMAGENET1K_V1": "regnet_y_16gf-9e6ed7dd.pth",
        "IMAGENET1K_V2": "regnet_y_16gf-3e4a00f9.pth",
    },
    "regnet_y_1_6gf": {
        "DEFAULT": "regnet_y_1_6gf-0d7bc02a.pth",
        "IMAGENET1K_V1": "regnet_y_1_6gf-b11a554e.pth",
        "IMAGENET1K_V2": "regnet_y_1_6gf-0d7bc02a.pth",
    },
    "regnet_y_32gf": {
        "DEFAULT": "regnet_y_32gf-8db6d4b5.pth",
        "IMAGENET1K_SWAG_E2E_V1": "regnet_y_32gf_swag-04fdfa75.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "regnet_y_32gf_lc_swag-e1583746.pth",
        "IMAGENET1K_V1": "regnet_y_32gf-4dee3f7a.pth",
        "IMAGENET1K_V2": "regnet_y_32gf-8db6d4b5.pth",
    },
    "regnet_y_3_2gf": {
        "DEFAULT": "regnet_y_3_2gf-9180c971.pth",
        "IMAGENET1K_V1": "regnet_y_3_2gf-b5a9779c.pth",
        "IMAGENET1K_V2": "regnet_y_3_2gf-9180c971.pth",
    },
    "regnet_y_400mf": {
        "DEFAULT": "regnet_y_400mf-e6988f5f.pth",
        "IMAGENET1K_V1": "regnet_y_400mf-c65dace8.pth",
        "IMAGENET1K_V2": "regnet_y_400mf-e6988f5f.pth",
    },
    "regnet_y_800mf": {
        "DEFAULT": "regnet_y_800mf-58fc7688.pth",
        "IMAGENET1K_V1": "regnet_y_800mf-1b27b58c.pth",
        "IMAGENET1K_V2": "regnet_y_800mf-58fc7688.pth",
    },
    "regnet_y_8gf": {
        "DEFAULT": "regnet_y_8gf-dc2b1b54.pth",
        "IMAGENET1K_V1": "regnet_y_8gf-d0d0e4a8.pth",
        "IMAGENET1K_V2": "regnet_y_8gf-dc2b1b54.pth",
    },
    "resnet101": {
        "DEFAULT": "resnet101-cd907fc2.pth",
        "IMAGENET1K_V1": "resnet101-63fe2227.pth",
        "IMAGENET1K_V2": "resnet101-cd907fc2.pth",
    },
    "resnet152": {
        "DEFAULT": "resnet152-f82ba261.pth",
        "IMAGENET1K_V1": "resnet152-394f9c45.pth",
        "IMAGENET1K_V2": "resnet152-f82ba261.pth",
    },
    "resnet18": {
        "DEFAULT": "resnet18-f37072fd.pth",
        "IMAGENET1K_V1": "resnet18-f37072fd.pth",
    },
    "resnet34": {
        "DEFAULT": "resnet34-b627a593.pth",
        "IMAGENET1K_V1": "resnet34-b627a593.pth",
    },
    "resnet50": {
        "DEFAULT": "resnet50-11ad3fa6.pth",
        "IMAGENET1K_V1": "resnet50-0676ba61.pth",
        "IMAGENET1K_V2": "resnet50-11ad3fa6.pth",
    },
    "resnext101_32x8d": {
        "DEFAULT": "resnext101_32x8d-110c445d.pth",
        "IMAGENET1K_V1": "resnext101_32x8d-8ba56ff5.pth",
        "IMAGENET1K_V2": "resnext101_32x8d-110c445d.pth",
    },
    "resnext101_64x4d": {
        "DEFAULT": "resnext101_64x4d-173b62eb.pth",
        "IMAGENET1K_V1": "resnext101_64x4d-173b62eb.pth",
    },
    "resnext50_32x4d": {
        "DEFAULT": "resnext50_32x4d-1a0047aa.pth",
        "IMAGENET1K_V1": "resnext50_32x4d-7cdf4587.pth",
        "IMAGENET1K_V2": "resnext50_32x4d-1a0047aa.pth",
    },
    "shufflenet_v2_x0_5": {
        "DEFAULT": "shufflenetv2_x0.5-f707e7126e.pth",
        "IMAGENET1K_V1": "shufflenetv2_x0.5-f707e7126e.pth",
    },
    "shufflenet_v2_x1_0": {
        "DEFAULT": "shufflenetv2_x1-5666bf0f80.pth",
        "IMAGENET1K_V1": "shufflenetv2_x1-5666bf0f80.pth",
    },
    "shufflenet_v2_x1_5": {
        "DEFAULT": "shufflenetv2_x1_5-3c479a10.pth",
        "IMAGENET1K_V1": "shufflenetv2_x1_5-3c479a10.pth",
    },
    "shufflenet_v2_x2_0": {
        "DEFAULT": "shufflenetv2_x2_0-8be3c8ee.pth",
        "IMAGENET1K_V1": "shufflenetv2_x2_0-8be3c8ee.pth",
    },
    "squeezenet1_0": {
        "DEFAULT": "squeezenet1_0-b66bff10.pth",
        "IMAGENET1K_V1": "squeezenet1_0-b66bff10.pth",
    },
    "squeezenet1_1": {
        "DEFAULT": "squeezenet1_1-b8a52dc0.pth",
        "IMAGENET1K_V1": "squeezenet1_1-b8a52dc0.pth",
    },
    "swin_b": {
        "DEFAULT": "swin_b-68c6b09e.pth",
        "IMAGENET1K_V1": "swin_b-68c6b09e.pth",
    },
    "swin_s": {
        "DEFAULT": "swin_s-5e29d889.pth",
        "IMAGENET1K_V1": "swin_s-5e29d889.pth",
    },
    "swin_t": {
        "DEFAULT": "swin_t-704ceda3.pth",
        "IMAGENET1K_V1": "swin_t-704ceda3.pth",
    },
    "swin_v2_b": {
        "DEFAULT": "swin_v2_b-781e5279.pth",
        "IMAGENET1K_V1": "swin_v2_b-781e5279.pth",
    },
    "swin_v2_s": {
        "DEFAULT": "swin_v2_s-637d8ceb.pth",
        "IMAGENET1K_V1": "swin_v2_s-637d8ceb.pth",
    },
    "swin_v2_t": {
        "DEFAULT": "swin_v2_t-b137f0e2.pth",
        "IMAGENET1K_V1": "swin_v2_t-b137f0e2.pth",
    },
    "vgg11": {
        "DEFAULT": "vgg11-8a719046.pth",
        "IMAGENET1K_V1": "vgg11-8a719046.pth",
    },
    "vgg11_bn": {
        "DEFAULT": "vgg11_bn-6002323d.pth",
        "IMAGENET1K_V1": "vgg11_bn-6002323d.pth",
    },
    "vgg13": {
        "DEFAULT": "vgg13-19584684.pth",
        "IMAGENET1K_V1": "vgg13-19584684.pth",
    },
    "vgg13_bn": {
        "DEFAULT": "vgg13_bn-abd245e5.pth",
        "IMAGENET1K_V1": "vgg13_bn-abd245e5.pth",
    },
    "vgg16": {
        "DEFAULT": "vgg16-397923af.pth",
        "IMAGENET1K_FEATURES": "vgg16_features-amdegroot-88682ab5.pth",
        "IMAGENET1K_V1": "vgg16-397923af.pth",
    },
    "vgg16_bn": {
        "DEFAULT": "vgg16_bn-6c64b313.pth",
        "IMAGENET1K_V1": "vgg16_bn-6c64b313.pth",
    },
    "vgg19": {
        "DEFAULT": "vgg19-dcbb9e9d.pth",
        "IMAGENET1K_V1": "vgg19-dcbb9e9d.pth",
    },
    "vgg19_bn": {
        "DEFAULT": "vgg19_bn-c79401a0.pth",
        "IMAGENET1K_V1": "vgg19_bn-c79401a0.pth",
    },
    "vit_b_16": {
        "DEFAULT": "vit_b_16-c867db91.pth",
        "IMAGENET1K_SWAG_E2E_V1": "vit_b_16_swag-9ac1b537.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "vit_b_16_lc_swag-4e70ced5.pth",
        "IMAGENET1K_V1": "vit_b_16-c867db91.pth",
    },
    "vit_b_32": {
        "DEFAULT": "vit_b_32-d86f8d99.pth",
        "IMAGENET1K_V1": "vit_b_32-d86f8d99.pth",
    },
    "vit_h_14": {
        "DEFAULT": "vit_h_14_swag-80465313.pth",
        "IMAGENET1K_SWAG_E2E_V1": "vit_h_14_swag-80465313.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "vit_h_14_lc_swag-c1eb923e.pth",
    },
    "vit_l_16": {
        "DEFAULT": "vit_l_16-852ce7e3.pth",
        "IMAGENET1K_SWAG_E2E_V1": "vit_l_16_swag-4f3808c9.pth",
        "IMAGENET1K_SWAG_LINEAR_V1": "vit_l_16_lc_swag-4d563306.pth",
        "IMAGENET1K_V1": "vit_l_16-852ce7e3.pth",
    },
    "vit_l_32": {
        "DEFAULT": "vit_l_32-c7638314.pth",
        "IMAGENET1K_V1": "vit_l_32-c7638314.pth",
    },
    "wide_resnet101_2": {
        "DEFAULT": "wide_resnet101_2-d733dc28.pth",
        "IMAGENET1K_V1": "wide_resnet101_2-32ee1156.pth",
        "IMAGENET1K_V2": "wide_resnet101_2-d733dc28.pth",
    },
    "wide_resnet50_2": {
        "DEFAULT": "wide_resnet50_2-9ba9bcbe.pth",
        "IMAGENET1K_V1": "wide_resnet50_2-95faca4d.pth",
        "IMAGENET1K_V2": "wide_resnet50_2-9ba9bcbe.pth",
    },
}
