"""Tiny random transformers tokenizer models for the tests: each backend class that
megamm.tokenizers.pretrained wraps, built from a small config, saved with
`save_pretrained` into a folder (no download). Sizes are chosen so that a folder builds
and round-trips in well under a second on a 2-core CPU (Emu3 and Xcodec take ~2 s to
initialise their weights)."""
from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_RATE = 16000
IMAGE_SIZE = 32


def build(name: str):
    """A tiny random model of transformers class `name`, eval(), seeded."""
    import transformers as T

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "Emu3VQVAE":
            m = T.Emu3VQVAE(T.Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                                              channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[],
                                              hidden_size=64, temporal_downsample_factor=4))
        elif name == "JanusVQVAE":
            m = T.JanusVQVAE(T.JanusVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8, base_channels=32,
                                                channel_multiplier=[1, 1, 2, 2, 2], num_res_blocks=1, num_patches=2,
                                                projection_dim=16, image_token_embed_dim=16))
        elif name == "ChameleonVQVAE":
            m = T.ChameleonVQVAE(T.ChameleonVQVAEConfig(embed_dim=4, num_embeddings=64, latent_channels=8,
                                                        resolution=IMAGE_SIZE, base_channels=32,
                                                        channel_multiplier=[1, 1, 2, 2, 2], num_res_blocks=1))
        elif name == "EncodecModel":
            m = T.EncodecModel(T.EncodecConfig(sampling_rate=SAMPLE_RATE, hidden_size=16, num_filters=4,
                                               upsampling_ratios=[8, 5, 4, 2], codebook_size=32, codebook_dim=16,
                                               num_lstm_layers=1, target_bandwidths=[0.5, 1.0]))
        elif name == "DacModel":
            m = T.DacModel(T.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=16,
                                       upsampling_ratios=[8, 5, 4, 2], n_codebooks=3, codebook_size=32, codebook_dim=4,
                                       hidden_size=16, hop_length=320, sampling_rate=SAMPLE_RATE))
        elif name == "MimiModel":
            m = T.MimiModel(T.MimiConfig(sampling_rate=SAMPLE_RATE, hidden_size=16, num_filters=4,
                                         upsampling_ratios=[8, 5, 4, 2], codebook_size=32, codebook_dim=16,
                                         num_quantizers=4, vector_quantization_hidden_dimension=16, upsample_groups=16,
                                         num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
                                         num_key_value_heads=2, head_dim=8, sliding_window=16))
        elif name == "XcodecModel":
            m = T.XcodecModel(T.XcodecConfig(
                sample_rate=SAMPLE_RATE, codebook_size=32, target_bandwidths=[0.5, 1.0],
                acoustic_model_config=dict(encoder_hidden_size=4, downsampling_ratios=[8, 5, 4, 2],
                                           decoder_hidden_size=16, n_codebooks=4, codebook_size=32, codebook_dim=4,
                                           hidden_size=16, upsampling_ratios=[8, 5, 4, 2], hop_length=320),
                semantic_model_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, conv_dim=[8] * 7, num_conv_pos_embeddings=16,
                                           num_conv_pos_embedding_groups=2)))
        elif name == "WavTokenizerModel":
            m = T.WavTokenizerModel(T.WavTokenizerConfig(
                sampling_rate=SAMPLE_RATE, num_filters=4, upsampling_ratios=[8, 5, 4, 2], num_lstm_layers=1,
                hidden_size=16, codebook_size=32, codebook_dim=16, decoder_hidden_size=16,
                decoder_intermediate_size=32, decoder_num_layers=1, decoder_attention_num_groups=4))
        else:
            raise KeyError(name)
    return m.eval()


def save(name: str, folder: Path) -> Path:
    """build(name).save_pretrained(folder); returns folder."""
    build(name).save_pretrained(str(folder))
    return folder
