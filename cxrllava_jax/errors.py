"""Project-wide error types, at the bottom of the layering so every package can raise and catch them."""


class InputError(ValueError):
    """A record that cannot be used; the message names the file or row and what is wrong.

    Pipelines catch exactly this type to skip and count bad records (`input_pipeline.pipelines`).
    """
