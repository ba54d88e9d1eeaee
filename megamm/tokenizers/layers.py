"""Building blocks of the image and audio autoencoders."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv_k(relu(x)))) at constant width; `dims` picks 1-D or 2-D."""

    def __init__(self, channels: int, dims: int = 2, kernel: int = 3, dilation: int = 1):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        pad = dilation * (kernel - 1) // 2
        self.conv1 = conv(channels, channels, kernel, padding=pad, dilation=dilation)
        self.conv2 = conv(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))
