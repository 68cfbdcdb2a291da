"""Model building blocks shared by SENet and CVNet: backbones, pooling, heads, official names."""
