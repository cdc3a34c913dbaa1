"""Initial schema: users, conversations, messages, usage.

Revision ID: 0001
Revises:
Create Date: 2024-11-28
"""

from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Kept here rather than imported from bots.db: a migration must not change when the models do.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _created_at() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                     server_default=sa.func.current_timestamp())


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigId, nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("platform_user_id", sa.String(100), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_user"),
    )
    op.create_table(
        "conversations",
        sa.Column("id", BigId, nullable=False),
        sa.Column("user_id", BigId, nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("workspace_id", sa.String(100), nullable=False, server_default=""),
        sa.Column("channel_id", sa.String(100), nullable=False),
        sa.Column("thread_id", sa.String(100), nullable=False, server_default=""),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("mode", sa.String(32), nullable=True),
        _created_at(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.current_timestamp()),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_conversations_user_id_users"),
        sa.UniqueConstraint("user_id", "platform", "workspace_id", "channel_id", "thread_id",
                            name="uq_conversations_place"),
    )
    op.create_table(
        "messages",
        sa.Column("id", BigId, nullable=False),
        sa.Column("conversation_id", BigId, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("method", sa.String(32), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("request_id", sa.String(100), nullable=True),
        sa.Column("status", sa.String(16), nullable=False, server_default="complete"),
        sa.Column("platform_message_ref", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE",
                                name="fk_messages_conversation_id_conversations"),
        sa.UniqueConstraint("request_id", name="uq_messages_request_id"),
        sa.CheckConstraint("role IN ('system', 'user', 'assistant')", name="ck_messages_role"),
        sa.CheckConstraint("status IN ('complete', 'pending', 'interrupted', 'failed')",
                           name="ck_messages_status"),
    )
    op.create_index("ix_messages_conversation_id_id", "messages", ["conversation_id", "id"])
    op.create_index("ix_messages_status", "messages", ["status"])
    op.create_index("ix_messages_created_at", "messages", ["created_at"])
    op.create_table(
        "usage",
        sa.Column("id", BigId, nullable=False),
        sa.Column("user_id", BigId, nullable=False),
        sa.Column("request_id", sa.String(100), nullable=True),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default=sa.text("0")),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_usage"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name="fk_usage_user_id_users"),
    )
    op.create_index("ix_usage_user_id", "usage", ["user_id"])


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("messages")
    op.drop_table("conversations")
    op.drop_table("users")
