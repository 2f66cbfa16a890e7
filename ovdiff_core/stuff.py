"""Thing/stuff labels for the category names of VOC, Pascal Context and COCO-Object.

"Stuff" categories are amorphous regions (sky, grass, water...). In OVDiff they
contribute no background prototypes (their support images' backgrounds are other stuff)
and they bypass the CLIP pre-filter. VOC and COCO-Object contain only things; the stuff
names below are those of Pascal Context (59 classes) plus common synonyms. Every other
name is a thing. Users override per category (``is_stuff(name, overrides)``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["COCO_OBJECT", "PASCAL_CONTEXT", "STUFF", "VOC", "is_stuff"]

VOC: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

PASCAL_CONTEXT: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip

COCO_OBJECT: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)  # fmt: skip

STUFF: frozenset[str] = frozenset(
    {
        # Pascal Context stuff classes
        "bedclothes", "building", "ceiling", "cloth", "curtain", "fence", "floor", "food",
        "grass", "ground", "mountain", "platform", "road", "rock", "sidewalk", "sky", "snow",
        "track", "tree", "wall", "water", "wood",
        # common synonyms and other amorphous regions
        "sea", "ocean", "lake", "river", "sand", "beach", "dirt", "mud", "field", "hill",
        "clouds", "cloud", "fog", "forest", "bush", "bushes", "leaves", "carpet", "rug",
        "pavement", "street", "gravel", "ice", "wallpaper", "tile", "brick wall", "plants",
    }
)  # fmt: skip


def is_stuff(name: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """Whether ``name`` is a stuff category (case-insensitive); ``overrides`` wins."""
    key = name.strip().lower()
    if overrides:
        for k, v in overrides.items():
            if k.strip().lower() == key:
                return bool(v)
    return key in STUFF
