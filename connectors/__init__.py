"""Pluggable connectors: channels, bots and apps. Each type registers under the entry-point
group ``convctl.connectors``; configuration lists named instances of those types."""
