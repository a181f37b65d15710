"""Small Flax NNX model ports used to test tqjax on real activations (import submodules explicitly)."""
