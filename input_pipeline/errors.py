"""The one error type of the input pipeline."""


class InputError(ValueError):
    """A record that cannot be used; the message names the file or row and what is wrong.

    Pipelines catch exactly this type to skip and count bad records (`input_pipeline.pipelines`).
    """
