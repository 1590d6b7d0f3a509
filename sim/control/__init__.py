"""Controllers: the plant-agnostic contract, the policies, their offline models, the budget coordinator."""

from sim.control.base import (
    Action,
    Controller,
    ControllerContext,
    ControllerError,
    Observation,
    build_controller,
)

__all__ = ["Action", "Controller", "ControllerContext", "ControllerError", "Observation", "build_controller"]
