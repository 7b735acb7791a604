"""Chat templates: sandboxed Jinja rendering, template discovery and message preparation."""

from kodkod.chat.discovery import find_template, list_templates, load_named_template
from kodkod.chat.errors import TemplateError, TemplateFileError
from kodkod.chat.messages import prepare_messages
from kodkod.chat.template import ChatTemplate, TemplateMetadata, strip_leading_bos

__all__ = [
    "ChatTemplate",
    "TemplateError",
    "TemplateFileError",
    "TemplateMetadata",
    "find_template",
    "list_templates",
    "load_named_template",
    "prepare_messages",
    "strip_leading_bos",
]
