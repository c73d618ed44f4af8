"""What the benchmarks share."""


def compiled_bytes(compiled) -> int:
    """Temporaries + arguments + outputs - aliased: what the computation holds at once, at most."""
    m = compiled.memory_analysis()
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
