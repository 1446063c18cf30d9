"""create adapters, aliases, lineage, prompts and artifacts

Revision ID: 0001_initial_schema
Revises: 
Create Date: 2026-11-22 10:23:22.584857
"""

from alembic import op

from registry import faults
import sqlalchemy as sa


revision = '0001_initial_schema'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('base_model', sa.String(length=512), nullable=False),
    sa.Column('base_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('use_rslora', sa.Boolean(), nullable=False),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('layout_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('peft_config', sa.JSON(), nullable=False),
    sa.Column('task', sa.String(length=128), nullable=True),
    sa.Column('task_description', sa.Text(), nullable=True),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('config_sha256', sa.String(length=64), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('recipe', sa.JSON(), nullable=False),
    sa.Column('encoder', sa.String(length=512), nullable=True),
    sa.Column('embedding', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_adapters_name_version')
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_layout_fingerprint'), ['layout_fingerprint'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_task'), ['task'], unique=False)
        batch_op.create_index(batch_op.f('ix_adapters_weights_sha256'), ['weights_sha256'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('artifact_type', sa.String(length=32), nullable=False),
    sa.Column('base_model', sa.String(length=512), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version', name='uq_artifacts_name_version')
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_artifact_type'), ['artifact_type'], unique=False)
        batch_op.create_index(batch_op.f('ix_artifacts_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_artifacts_sha256'), ['sha256'], unique=False)

    op.create_table('adapter_tags',
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('tag', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('adapter_id', 'tag')
    )
    with op.batch_alter_table('adapter_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_tags_tag'), ['tag'], unique=False)

    op.create_table('aliases',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('alias', sa.String(length=128), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('name', 'alias')
    )
    op.create_table('lineage',
    sa.Column('child_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('parent_ref', sa.String(length=160), nullable=False),
    sa.Column('weight', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['child_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['parent_id'], ['adapters.id'], ),
    sa.PrimaryKeyConstraint('child_id', 'position')
    )
    faults.point("migration.mid")  # crash tests: a kill here must leave no partial schema
    op.create_table('prompts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prompts_adapter_id'), ['adapter_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('prompts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_prompts_adapter_id'))

    op.drop_table('prompts')
    op.drop_table('lineage')
    op.drop_table('aliases')
    with op.batch_alter_table('adapter_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_tags_tag'))

    op.drop_table('adapter_tags')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_sha256'))
        batch_op.drop_index(batch_op.f('ix_artifacts_name'))
        batch_op.drop_index(batch_op.f('ix_artifacts_artifact_type'))

    op.drop_table('artifacts')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_weights_sha256'))
        batch_op.drop_index(batch_op.f('ix_adapters_task'))
        batch_op.drop_index(batch_op.f('ix_adapters_name'))
        batch_op.drop_index(batch_op.f('ix_adapters_layout_fingerprint'))
        batch_op.drop_index(batch_op.f('ix_adapters_kind'))
        batch_op.drop_index(batch_op.f('ix_adapters_digest'))
        batch_op.drop_index(batch_op.f('ix_adapters_base_model'))

    op.drop_table('adapters')
