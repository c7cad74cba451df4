"""Plain-PyTorch references: the test oracle of every op, and its fallback when no kernel runs."""
