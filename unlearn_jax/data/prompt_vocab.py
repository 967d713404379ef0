"""The words of the generated prompt sets: classes, templates, artists, subjects, scenes.

Data only; `unlearn_jax.data.prompt_sets` builds the sets from it. Templates use
`{a}` for a class with its article ("a tench", "an English springer") and `{c}`
for the bare class; style templates `{s}` (subject) and `{artist}`. The COCO-style
vocabulary is written for this project (no COCO caption is copied): each scene
lists places, what people do there and what is there.
"""

# ---------------------------------------------------------------------------
# Object classes (Imagenette)
# ---------------------------------------------------------------------------

IMAGENETTE_CLASSES = (
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
)
# {a}: the class with its article ("a tench", "an English springer"); {c}: the bare class.
OBJECT_TEMPLATES = (
    "an image of {a}",
    "a photo of {a}",
    "a picture of {a}",
    "a close-up photo of {a}",
    "a bright photo of {a}",
    "a cropped photo of {a}",
    "a detailed photo of {a}",
    "a blurry photo of {a}",
)
OBJECT_EVAL_TEMPLATES = (
    "a good photo of {a}",
    "a photo of the {c}",
    "a low resolution photo of {a}",
    "a jpeg photo of {a}",
    "a dark photo of {a}",
    "a photo of one {c}",
)
OBJECT_LABEL_TEMPLATE = "a photo of a {}"
# The anchor of each class for the remap family: its parent class or a close
# neighbour that is not one of the ten, so that "a photo of a tench" is remapped to
# "a photo of a fish" (the same photo, the concept replaced; Concept Ablation's pairing).
IMAGENETTE_ANCHORS = {
    "tench": "fish",
    "English springer": "dog",
    "cassette player": "radio",
    "chain saw": "hand saw",
    "church": "building",
    "French horn": "trumpet",
    "garbage truck": "truck",
    "gas pump": "vending machine",
    "golf ball": "ball",
    "parachute": "kite",
}

# ---------------------------------------------------------------------------
# Artistic styles
# ---------------------------------------------------------------------------

STYLE_ARTIST = "Vincent van Gogh"
# Painters close to Van Gogh in period, subject matter or technique: the hard retain set.
NEIGHBOUR_ARTISTS = (
    "Claude Monet",
    "Paul Cézanne",
    "Paul Gauguin",
    "Georges Seurat",
    "Henri de Toulouse-Lautrec",
    "Edvard Munch",
    "Pablo Picasso",
    "Pierre-Auguste Renoir",
)
STYLE_SUBJECTS = (
    "a field of wheat under a blue sky",
    "a vase of sunflowers",
    "a cafe terrace at night",
    "a portrait of a man with a hat",
    "a bridge over a river",
    "a village church",
    "olive trees on a hillside",
    "a bedroom with a wooden bed",
    "a harbour with fishing boats",
    "a country road lined with cypress trees",
    "a woman reading by a window",
    "a bowl of fruit on a table",
)
STYLE_EVAL_SUBJECTS = (
    "a garden in bloom",
    "a city street in the rain",
    "a farmhouse in the countryside",
    "a portrait of an old woman",
    "a lighthouse by the sea",
    "a pair of old boots",
    "a snowy mountain village",
    "a family having a picnic",
)
STYLE_TEMPLATES = ("{s} in the style of {artist}", "a painting of {s} by {artist}")
# STYLE_TEMPLATES with the style phrase removed, one per template (same order): the
# anchors of the forget prompts ("a painting of {s} by {artist}" -> "a painting of {s}").
STYLE_ANCHOR_TEMPLATES = ("{s}", "a painting of {s}")
STYLE_EVAL_TEMPLATES = ("{s} in the style of {artist}", "{s}, an oil painting by {artist}")
STYLE_LABEL_TEMPLATE = "a painting by {}"

# ---------------------------------------------------------------------------
# COCO-style captions: scenes, each with places, what people do there and what is there
# ---------------------------------------------------------------------------

PEOPLE = (
    "a man",
    "a woman",
    "a young boy",
    "a little girl",
    "an older man",
    "a young woman",
    "a teenager",
    "a person",
)
SCENES: dict[str, dict[str, tuple[str, ...]]] = {
    "street": {
        "places": (
            "on a city street",
            "on a busy sidewalk",
            "near a crosswalk",
            "in front of a brick building",
        ),
        "actions": (
            "riding a bicycle",
            "holding an umbrella",
            "talking on a cell phone",
            "walking a dog",
            "waiting for a bus",
            "carrying a shopping bag",
        ),
        "things": (
            "a red double decker bus",
            "a yellow taxi",
            "a parked motorcycle",
            "a fire hydrant",
            "a traffic light",
        ),
    },
    "park": {
        "places": ("in a grassy park", "on a path through a park", "next to a pond"),
        "actions": (
            "flying a kite",
            "throwing a frisbee",
            "sitting on a bench",
            "reading a book",
            "playing with a dog",
            "eating a sandwich",
        ),
        "things": ("a wooden bench", "a brown dog", "a flock of pigeons", "a picnic blanket"),
    },
    "beach": {
        "places": ("on a sandy beach", "near the ocean", "on the shore of a lake"),
        "actions": (
            "carrying a surfboard",
            "flying a kite",
            "walking barefoot",
            "sitting under an umbrella",
        ),
        "things": ("a colorful umbrella", "a small boat", "a group of seagulls", "a surfboard"),
    },
    "kitchen": {
        "places": ("in a kitchen", "in a small kitchen", "at a kitchen counter"),
        "actions": (
            "cooking dinner",
            "cutting vegetables",
            "washing dishes",
            "making a sandwich",
            "baking a cake",
        ),
        "things": (
            "a plate of food",
            "a bowl of fruit",
            "a stainless steel refrigerator",
            "a pot on the stove",
        ),
    },
    "snow": {
        "places": ("on a snowy slope", "on a snow covered hill", "in a snowy forest"),
        "actions": ("skiing", "riding a snowboard", "building a snowman", "pulling a sled"),
        "things": ("a pair of skis", "a wooden cabin", "a snowy pine tree"),
    },
    "home": {
        "places": ("in a living room", "in a bedroom", "in a cozy room"),
        "actions": (
            "watching television",
            "playing a video game",
            "working on a laptop",
            "petting a cat",
            "reading a newspaper",
        ),
        "things": ("a sleeping cat", "a laptop computer", "a stack of books", "a potted plant"),
    },
    "farm": {
        "places": ("in a green pasture", "on a farm", "in an open field"),
        "actions": ("riding a horse", "feeding a goat", "walking along a fence"),
        "things": ("a herd of cows", "a brown horse", "a flock of sheep", "a red tractor"),
    },
    "station": {
        "places": ("at a train station", "on a train platform"),
        "actions": ("pulling a suitcase", "waiting for a train", "looking at a map"),
        "things": ("a passenger train", "a row of suitcases", "a large clock"),
    },
}
