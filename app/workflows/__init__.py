"""User-defined Flow Nexus workflows: definitions, validation, step types,
persistence of executions and the tools' service layer.

`steps`, `validation` and `templates` import only pydantic and the standard
library, because `FlowNexusWorkflow` uses them inside the workflow sandbox.
"""
