"""LPIPS, the integrity metric, FID, CLIPScore and forget rates."""
