"""Chapter 10: vision transformers, CLIP and a small promptable segmenter, trained from scratch offline.

- `data`: generated scenes of coloured shapes with nested objects, exact masks, captions, a word tokenizer.
- `vit`: ViT (Dosovitskiy et al. 2021) on the course's shared transformer blocks, 2-D sin-cos positions,
  optional windowed blocks mixed with global ones (ViTDet, Li et al. 2022; SAM's encoder).
- `clip`: CLIP (Radford et al. 2021): image and text encoders, the symmetric contrastive loss, zero-shot.
- `sam`: prompt encoder, two-way mask decoder, losses and interactive training (Kirillov et al. 2023).
"""
