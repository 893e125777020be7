"""Label values and geometry shared by the whole package (data, model, training, benches).

Labels: 0 background, 1 the episode's target class, 255 ignored (void borders, and the padding a
resize or crop adds). The backbone's output stride is 8, so an input side ``H`` gives a feature
side ``(H - 1) // 8 + 1`` and valid input sides satisfy ``(H - 1) % 8 == 0``.
"""
BACKGROUND_LABEL = 0
FOREGROUND_LABEL = 1
IGNORE_LABEL = 255
# Every label value the model accepts.
VALID_LABELS = (BACKGROUND_LABEL, FOREGROUND_LABEL, IGNORE_LABEL)
OUTPUT_STRIDE = 8


def feature_size(image_size: int) -> int:
    """Side of the backbone's feature map for an input side ``image_size`` (``(H - 1) % 8 == 0``)."""
    return (image_size - 1) // OUTPUT_STRIDE + 1
