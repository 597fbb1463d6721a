"""The SigLIP vision transformer as Gemma 3 uses it (transformers' SiglipVisionModel with vision_use_head=False).

Shape of the computation, per image of S x S pixels and patch P:
    Conv2d(P, stride P) -> (S/P)^2 patch vectors + learned position embedding
    -> L pre-LN encoder layers (x + attn(LN1 x); x + MLP(LN2 x)), biased q/k/v/out, GeLU-tanh MLP
    -> post_layernorm.
There is no CLS token and no pooling head here: the Gemma 3 projector (projector.py) pools the patch grid itself.
The `VisionTower` at the bottom glues the two and is what the vision service calls.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model_workers.gemma3.config import VisionConfig
from model_workers.gemma3.projector import Gemma3Projector


class SiglipAttention(nn.Module):
    """Full (bidirectional) multi-head self-attention over the patches of one image."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # No mask: every patch sees every other patch; SDPA's default scale is head_dim ** -0.5 as in SigLIP.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, device=device, dtype=dtype)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(cfg, **kw)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(cfg, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, **kw)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size, **kw)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # [N, D, S/P, S/P]
        # Row-major flatten of the grid: position i is row i // side, column i % side (the projector relies on it).
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, device, dtype) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """Parameter names match the checkpoint's after the `vision_tower.[vision_model.]` prefix is stripped."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg, device, dtype)
        self.encoder = SiglipEncoder(cfg, device, dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> last hidden state [N, (S/P)^2, hidden]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class VisionTower(nn.Module):
    """SigLIP + Gemma 3 projector: pixels in, soft tokens (in the text model's width) out."""

    def __init__(self, cfg: VisionConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.vision = SiglipVisionTransformer(cfg, device, dtype)
        self.projector = Gemma3Projector(cfg, device, dtype)

    @property
    def device(self) -> torch.device:
        return self.projector.mm_input_projection_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.mm_input_projection_weight.dtype

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """[N, 3, S, S] float pixels -> [N, mm_tokens_per_image, text_hidden] in `out_dtype` (default: the model's)."""
        s = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(
                f"pixel_values must be [N, {self.cfg.num_channels}, {s}, {s}], got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self.projector(self.vision(x))
        return out if out_dtype is None else out.to(out_dtype)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> VisionTower:
        """Build the tower from a Gemma 3 checkpoint directory (config.json + safetensors) and load its weights."""
        from model_workers.gemma3.vision_weights import load_vision_state_dict

        cfg = VisionConfig.from_checkpoint(path)
        # Build on the meta device, then materialise from the checkpoint: no random init of 400M parameters.
        with torch.device("meta"):
            tower = cls(cfg, device="meta", dtype=dtype)
        expected = {name: tuple(p.shape) for name, p in tower.state_dict().items()}
        state = load_vision_state_dict(path, expected)
        tower.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return tower.to(device).eval()

    @classmethod
    def random(
        cls, cfg: VisionConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> VisionTower:
        """Random weights of the right shape (benchmarks); small scales so activations stay finite."""
        torch.manual_seed(seed)
        tower = cls(cfg, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(tower.projector.mm_input_projection_weight, std=cfg.hidden_size**-0.5)
        return tower.eval()
