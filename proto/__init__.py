"""Protocol definitions: the .proto sources here, generated code in proto.gen.

Nothing in this package imports shim or agent code.
"""
