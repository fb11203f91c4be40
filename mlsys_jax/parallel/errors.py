"""The one error a plan raises when it cannot work."""


class PlanError(ValueError):
    """A placement that cannot work: the message names the parameter, its shape, the axis,
    the mesh size and a fix."""
