"""ResNet-18 and MobileNetV2 written in torch (no torchvision here), with random weights and
randomised BatchNorm statistics, exported to ONNX: the models bench/test_bench_models.py runs.
Architectures follow the papers (He et al. 2015, basic blocks; Sandler et al. 2018)."""
import torch
import torch.nn as nn


class Basic(nn.Module):
    """ResNet basic block: two 3x3 convolutions, identity or 1x1 projection shortcut."""

    def __init__(s, i, o, stride):
        super().__init__()
        s.c1 = nn.Conv2d(i, o, 3, stride, 1, bias=False); s.b1 = nn.BatchNorm2d(o)
        s.c2 = nn.Conv2d(o, o, 3, 1, 1, bias=False); s.b2 = nn.BatchNorm2d(o)
        s.down = None if stride == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
    def forward(s, x):
        y = torch.relu(s.b1(s.c1(x))); y = s.b2(s.c2(y))
        return torch.relu(y + (x if s.down is None else s.down(x)))
class ResNet18(nn.Module):
    def __init__(s, classes=1000):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, c = [], 64
        for o, st in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Basic(c, o, st), Basic(o, o, 1)]; c = o
        s.layers = nn.Sequential(*layers)
        s.fc = nn.Linear(512, classes)
    def forward(s, x):
        x = s.layers(s.stem(x))
        return s.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
class InvRes(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project."""

    def __init__(s, i, o, stride, t):
        super().__init__()
        h = i * t; L = []
        if t != 1: L += [nn.Conv2d(i, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()]
        L += [nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
              nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o)]
        s.conv = nn.Sequential(*L); s.res = stride == 1 and i == o
    def forward(s, x):
        return x + s.conv(x) if s.res else s.conv(x)
class MobileNetV2(nn.Module):
    def __init__(s, classes=1000):
        super().__init__()
        L = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        c = 32
        for t, o, n, st in ((1,16,1,1),(6,24,2,2),(6,32,3,2),(6,64,4,2),(6,96,3,1),(6,160,3,2),(6,320,1,1)):
            for k in range(n):
                L.append(InvRes(c, o, st if k == 0 else 1, t)); c = o
        L += [nn.Conv2d(c, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        s.features = nn.Sequential(*L)
        s.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))
    def forward(s, x):
        x = nn.functional.adaptive_avg_pool2d(s.features(x), 1)
        return s.classifier(torch.flatten(x, 1))
def randomize(m):
    """Non-trivial BatchNorm statistics (fresh ones are the identity), eval mode."""

    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.1, 0.1, generator=g); mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g); mod.bias.uniform_(-0.1, 0.1, generator=g)
    return m.eval()
def export(model, path, batch=1):
    """Random weights (seeded), ONNX opset 17, the batch dimension free."""

    torch.manual_seed(0)
    m = randomize(model)
    torch.onnx.export(m, torch.randn(batch, 3, 224, 224), path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
