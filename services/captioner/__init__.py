"""Captioner service: image -> short description + keywords (Qwen-VL or an offline model)."""
