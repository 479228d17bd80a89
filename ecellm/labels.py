"""The label of a position without loss, shared by the data pipeline and the models' losses (data does not import
the models)."""

IGNORE_INDEX = -100  # PyTorch's cross_entropy default `ignore_index`, and the reference code's
